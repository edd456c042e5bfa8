"""The NBD export: `server.NBDServer` serves mapped devices over NBD, one connection per
client (`connection`), each with a catalog of what it may select (`catalog`)."""
