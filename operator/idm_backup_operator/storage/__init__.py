"""Where archives are kept: an S3 bucket or a PersistentVolumeClaim, behind one interface."""

from idm_backup_operator.storage.base import ObjectNotFound, StorageError, Store, StoredObject, Upload
from idm_backup_operator.storage.pvc import PVCStore
from idm_backup_operator.storage.s3 import S3Config, S3Store

__all__ = [
    "ObjectNotFound",
    "PVCStore",
    "S3Config",
    "S3Store",
    "StorageError",
    "Store",
    "StoredObject",
    "Upload",
]
