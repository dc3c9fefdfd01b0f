"""The build worker (`imagefactory builder`): claims builds from the core services, bakes
them in a child process, and uploads the results. docs/build-service.md."""
