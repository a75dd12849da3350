"""IdmRestore: one restore of a stored backup into a FreeIPA server, gated, staged, checked and cleaned up."""
