"""Facts about the build host: which tools are missing (`doctor`), whether KVM really
works (`accel`), and where the UEFI firmware is (`firmware`). Used by baking and booting."""
