"""NBD protocol constants (magics, options, replies, commands, flags, errors).

Values follow the NBD protocol specification (NetworkBlockDevice/nbd, doc/proto.md).
"""

from __future__ import annotations

import errno

# ---- handshake --------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0         # client flags
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ---- transmission flags (per export) ----------------------------------------------------
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# ---- requests and replies ---------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"

# ---- errors (the only values allowed on the wire) ---------------------------------------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

WIRE_ERRNOS = frozenset((NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC,
                         NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN))

#: host errno -> wire errno, for errnos that are not sent unchanged
_ERRNO_TO_WIRE = {
    errno.EPERM: NBD_EPERM, errno.EACCES: NBD_EPERM, errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM, errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW, errno.ENOTSUP: NBD_ENOTSUP, errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN, errno.ENXIO: NBD_ESHUTDOWN, errno.ENODEV: NBD_ESHUTDOWN,
    errno.EBADF: NBD_ESHUTDOWN,
}

#: wire errno -> host errno (the client side)
_WIRE_TO_ERRNO = {NBD_EPERM: errno.EPERM, NBD_EIO: errno.EIO, NBD_ENOMEM: errno.ENOMEM,
                  NBD_EINVAL: errno.EINVAL, NBD_ENOSPC: errno.ENOSPC,
                  NBD_EOVERFLOW: errno.EOVERFLOW, NBD_ENOTSUP: errno.ENOTSUP,
                  NBD_ESHUTDOWN: errno.ESHUTDOWN}


def errno_to_wire(err: int) -> int:
    """Map a host errno (from a DMError or OSError) to an NBD error value; unknown -> EIO."""
    return _ERRNO_TO_WIRE.get(err, NBD_EIO)


def wire_to_errno(err: int) -> int:
    """Map an NBD error value to a host errno; unknown values -> EIO."""
    return _WIRE_TO_ERRNO.get(err, errno.EIO)


# ---- limits -----------------------------------------------------------------------------
MAX_PAYLOAD = 32 * 1024 * 1024          # advertised maximum payload (read/write length)
PREFERRED_BLOCK = 4096
MAX_OPTION_LENGTH = 64 * 1024           # longer option data is a denial of service: hang up
MAX_STRING = 4096                       # export names, queries (spec limit)
