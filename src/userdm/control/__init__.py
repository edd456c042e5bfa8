"""Control of the daemon: the sans-IO control protocol, its server, the client, the daemon."""
