"""Where archives are kept: an S3 bucket or a PersistentVolumeClaim, behind one interface."""

from idm_backup_operator.storage.base import (
    DeadlineExceeded,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    StorageFull,
    Store,
    StoredObject,
    Upload,
)
from idm_backup_operator.storage.pvc import PVCStore, claim_mount
from idm_backup_operator.storage.s3 import S3Config, S3Store

__all__ = [
    "DeadlineExceeded",
    "ObjectExists",
    "ObjectNotFound",
    "PVCStore",
    "S3Config",
    "S3Store",
    "StorageError",
    "StorageFull",
    "Store",
    "StoredObject",
    "Upload",
    "claim_mount",
]
