"""How mapped devices reach their consumers, above the device-mapper core (DESIGN §1).

- `nbd`: the NBD server (handshake driver, export catalog, connections); the wire protocol
  and the `nbd://` client stay in `userdm.nbd`, below the core;
- `fuse`: one file per mapped device in a FUSE directory (for loop devices and filesystems).

Every export reaches the core through the same small interface, `ExportSource`
(`userdm.export.source`): the names of the devices to export, their info, and opens.
"""
