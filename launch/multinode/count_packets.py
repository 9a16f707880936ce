"""Counts the frames on a network interface by protocol, source and destination until its
standard input closes (or SIGTERM, Ctrl-C), then writes the counts as JSON. Run on node 1 of launch/multinode/nodes.sh:
every frame either node sends to or receives from the network crosses node 1's eth0, the nodes'
only link, so the counts show every address the nodes talked to.

    sudo bash launch/multinode/nodes.sh exec 1 python3 launch/multinode/count_packets.py eth0 counts.json
    # ... run something on the nodes, then Ctrl-C (or close its stdin, as tests/test_multinode.py does)

Writes {"frames": {"tcp 10.213.0.2 > 10.213.0.1": [frames, bytes], ...}, "addresses": [...]}.
Standard library only (an AF_PACKET socket: root, Linux).
"""

import ipaddress
import json
import select
import signal
import socket
import sys

ETH_P_ALL = 0x0003
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp"}


def describe(frame: bytes) -> tuple[str, str | None, str | None]:
    """(protocol, source address, destination address) of an Ethernet frame."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0800:  # IPv4
        protocol = PROTOCOLS.get(frame[23], f"ip-proto-{frame[23]}")
        return protocol, str(ipaddress.IPv4Address(frame[26:30])), str(ipaddress.IPv4Address(frame[30:34]))
    if ethertype == 0x0806:  # ARP: sender and target protocol addresses
        return "arp", str(ipaddress.IPv4Address(frame[28:32])), str(ipaddress.IPv4Address(frame[38:42]))
    if ethertype == 0x86DD:  # IPv6
        return "ipv6", str(ipaddress.IPv6Address(frame[22:38])), str(ipaddress.IPv6Address(frame[38:54]))
    return f"ethertype-{ethertype:04x}", None, None


def main(interface: str, out: str) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
    sock.bind((interface, 0))  # both directions: frames sent and received on this interface
    counts: dict[str, list[int]] = {}
    addresses: set[str] = set()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"counting frames on {interface}", flush=True)
    try:
        while True:
            ready, _, _ = select.select([sock, sys.stdin], [], [])
            if sys.stdin in ready and not sys.stdin.buffer.read1(1024):
                break  # stdin closed: stop
            if sock not in ready:
                continue
            frame = sock.recv(1 << 18)  # large enough for a segmentation-offloaded TCP frame
            protocol, source, destination = describe(frame)
            entry = counts.setdefault(f"{protocol} {source} > {destination}", [0, 0])
            entry[0] += 1
            entry[1] += len(frame)
            addresses.update(a for a in (source, destination) if a)
    except KeyboardInterrupt:
        pass
    with open(out, "w") as f:
        json.dump({"interface": interface, "frames": counts, "addresses": sorted(addresses)}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} INTERFACE OUT.json")
    main(sys.argv[1], sys.argv[2])
