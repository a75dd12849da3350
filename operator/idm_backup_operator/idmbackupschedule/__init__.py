"""The IdmBackupSchedule kind: its clock (cron), its retention plan, and reconciling both with the cluster.

A schedule makes IdmBackups, so this package builds on idmbackup; idmbackup knows nothing of schedules.
"""
