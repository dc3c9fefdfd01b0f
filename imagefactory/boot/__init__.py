"""Running nodes from an environment: identity (node.env, NoCloud seed), the QEMU and
libvirt backends, the console, waiting for nodes, SSH, and each node's state directory.
`launch.py` is the script of steps behind `imagefactory boot`."""
