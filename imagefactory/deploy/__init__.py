"""Deployment: get an environment from the store onto a device from the inventory, start
it as a node, and take it off again (`imagefactory deploy`, `undeploy`, `boot --from`)."""
