#!/usr/bin/env python3
"""A Modbus device from another stack (pymodbus), holding known values in several types
and word orders, for the interop tests. Word orders are computed here independently of the
gateway: ABCD big-endian, CDAB word-swapped, BADC byte-swapped, DCBA little-endian.

Usage: modbus_server.py PORT                   (Modbus TCP on 127.0.0.1:PORT)
       modbus_server.py rtu DEVICE BAUD UNIT   (Modbus RTU, 8N1, on a serial device or pty:
                                                 pyserial cannot set parity on a pty)
"""
import asyncio
import struct
import sys

from pymodbus.datastore import (ModbusDeviceContext, ModbusSequentialDataBlock,
                                ModbusServerContext)
from pymodbus import FramerType
from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer


def words(fmt, value, order):
    b = struct.pack(">" + fmt, value)
    w = [b[i:i + 2] for i in range(0, len(b), 2)]
    if order in ("CDAB", "DCBA"):
        w = w[::-1]
    if order in ("BADC", "DCBA"):
        w = [x[::-1] for x in w]
    return [int.from_bytes(x, "big") for x in w]


def main():
    hr, ir, co, di = [0] * 300, [0] * 20, [False] * 20, [False] * 20

    def put(table, addr, values):
        table[addr:addr + len(values)] = values

    # Lists are indexed by protocol address (what a client asks for). pymodbus 3.16's
    # sequential block takes the first address plus one (its legacy one-based numbering).
    put(hr, 100, words("f", 12.5, "CDAB"))
    put(hr, 102, words("i", -123456, "ABCD"))
    put(hr, 104, words("d", -2.75, "DCBA"))
    put(hr, 108, words("I", 3000000000, "BADC"))
    put(hr, 110, words("h", -7, "ABCD"))
    put(ir, 0, [2500])
    put(co, 5, [True])
    put(di, 2, [True])
    device = ModbusDeviceContext(
        hr=ModbusSequentialDataBlock(1, hr),
        ir=ModbusSequentialDataBlock(1, ir),
        co=ModbusSequentialDataBlock(1, co),
        di=ModbusSequentialDataBlock(1, di),
    )
    if sys.argv[1] == "rtu":
        device_path, baud, unit = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        context = ModbusServerContext(devices={unit: device}, single=False)
        print("ready", flush=True)
        asyncio.run(StartAsyncSerialServer(context, framer=FramerType.RTU, port=device_path,
                                           baudrate=baud, parity="N", stopbits=1, bytesize=8))
    else:
        context = ModbusServerContext(devices=device, single=True)
        print("ready", flush=True)
        asyncio.run(StartAsyncTcpServer(context, address=("127.0.0.1", int(sys.argv[1]))))


if __name__ == "__main__":
    main()
