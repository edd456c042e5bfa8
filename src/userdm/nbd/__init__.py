"""NBD: the protocol as sans-IO state machines, the export server and the nbd:// client.

- `protocol`, `handshake`, `constants`: wire formats and state machines, no sockets;
- `server.NBDServer` (with `connection`, `catalog`): exports mapped devices;
- `client`: `nbd://` and `nbd+unix://` device references for tables.
"""
