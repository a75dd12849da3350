"""`python -m idm_backup_operator` is the same as the `idm-backup-operator` command."""

import sys

from idm_backup_operator.cli import main

sys.exit(main())
