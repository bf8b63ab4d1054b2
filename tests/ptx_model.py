"""Executes the integer PTX of the NF4 lookup (kernels/nf4_decode._lut_asm) on the CPU.

The Triton interpreter cannot run inline PTX, so the in-register lookup is tested by running its
text instruction by instruction with the semantics the PTX ISA states for the few instructions it
uses (prmt.b32 default mode, lop3.b32, xor/shr/mul.hi/cvt); an instruction outside them is an error.
"""

from __future__ import annotations

MASK = 0xFFFFFFFF


def prmt(a: int, b: int, selector: int) -> int:
    """prmt.b32 d, a, b, c: byte i of d is byte c[4i+2:4i] of {b, a} (a holds bytes 0-3), or, when
    c[4i+3] is set, that byte's sign bit replicated."""
    source = (b << 32) | a
    out = 0
    for i in range(4):
        field = (selector >> (4 * i)) & 0xF
        byte = (source >> (8 * (field & 7))) & 0xFF
        if field & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """lop3.b32 d, a, b, c, immLut: bit j of d is bit (a_j << 2 | b_j << 1 | c_j) of immLut."""
    out = 0
    for bit in range(32):
        index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


_OPS = {
    "prmt.b32": lambda a, b, c: prmt(a, b, c),
    "lop3.b32": lop3,
    "xor.b32": lambda a, b: a ^ b,
    "shr.b32": lambda a, b: a >> b,
    "mul.hi.u32": lambda a, b: (a * b) >> 32,
    "cvt.u32.u16": lambda a: a & 0xFFFF,
}


def run(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Registers after running ``asm`` with ``operands`` ({"$4": value, ...}) as inputs."""
    registers = dict(operands)

    def value(token: str) -> int:
        token = token.strip()
        if token.startswith("0x"):
            return int(token, 16)
        if token.isdigit():
            return int(token)
        return registers[token]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        opcode, rest = line.split(None, 1)
        if opcode not in _OPS:
            raise ValueError(f"asm: instruction {opcode!r} is not modelled")
        destination, *sources = [token.strip() for token in rest.split(",")]
        registers[destination] = _OPS[opcode](*map(value, sources)) & MASK
    return registers
