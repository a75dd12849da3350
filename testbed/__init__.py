"""Local test platform for idm-backup-operator."""
