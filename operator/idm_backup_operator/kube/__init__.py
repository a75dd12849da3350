"""The only modules that talk to the Kubernetes API: the clients a job uses (services), the objects a spec
refers to (references), exec into the FreeIPA pod (podexec), one backup per server (locking), and status
and Events (reporting).
"""
