"""The IdmBackup kind: the pipeline that takes one backup, and the checks a spec must pass."""
