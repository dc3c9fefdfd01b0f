"""Baking environments from the target table: the cached base image, the artifacts a
guest needs (executor, pipeline, unit), Packer templates, and the VM image bake
(`vm.py`). Each environment kind gets one module here beside `vm.py`."""
