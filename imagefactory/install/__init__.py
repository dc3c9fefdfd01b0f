"""`imagefactory install`: a bare-metal installer (bake --format installer) run on
devices over SSH, one thread per device."""
