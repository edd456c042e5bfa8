"""Create a striped device over two files through a running daemon, write and read it, remove it."""
import sys, tempfile
import userdm

with tempfile.TemporaryDirectory() as d, userdm.connect(sys.argv[1] if len(sys.argv) > 1 else None) as dm:
    disks = [f"{d}/disk{i}.img" for i in range(2)]
    for path in disks:
        open(path, "wb").truncate(8 << 20)
    dm.create("stripes", f"0 16384 striped 2 128 {disks[0]} 0 {disks[1]} 0")
    with dm.open_device("stripes") as dev:
        dev.write(0, b"hello, stripes" * 1000)
        assert dev.read(0, 14) == b"hello, stripes" and dev.size == 16384 * 512
    dm.remove("stripes")
