"""kopf handlers, one module per resource kind; importing this package registers them all."""

from idm_backup_operator.handlers import (
    idmbackup,
    idmbackupschedule,
    idmrestore,
    observe,
    startup,
    storagecheck,
)

__all__ = ["idmbackup", "idmbackupschedule", "idmrestore", "observe", "startup", "storagecheck"]
