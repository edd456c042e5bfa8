"""NBD below the device-mapper core: the protocol as sans-IO state machines, and the client.

- `protocol`, `handshake`, `constants`: wire formats and state machines, no sockets (both
  sides of the handshake; the server that drives them is `userdm.export.nbd`);
- `client`: `nbd://` and `nbd+unix://` device references for tables.
"""
