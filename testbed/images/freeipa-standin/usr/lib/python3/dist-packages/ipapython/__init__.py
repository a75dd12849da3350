"""TEST STAND-IN for FreeIPA's ipapython package -- NOT FreeIPA.

Part of the idm-backup-operator test platform (testbed/images/freeipa-standin). Only `version` exists,
so that `python3 -c 'from ipapython import version; print(version.VERSION)'` answers on the stand-in
as it does on a real FreeIPA server.
"""
