"""The API process of the test's ISP router: hands ExaBGP each line written to a FIFO.

python isp_commands.py FIFO
"""

import os
import sys


def main() -> None:
    # Opened read-write so that the FIFO never reports end-of-file between writers.
    with os.fdopen(os.open(sys.argv[1], os.O_RDWR), "rb", buffering=0) as commands:
        for line in iter(commands.readline, b""):
            sys.stdout.write(line.decode())
            sys.stdout.flush()


if __name__ == "__main__":
    main()
