#!/usr/bin/env python3
"""Writes fuzz/corpus/: the committed inputs that scripts/fuzz starts from and
that ctest replays through the same entry points (fuzz/replay.cpp).

seed-*   small valid inputs of each kind;
finding-* inputs that reproduce what fuzzing found so far (each is now
          rejected with a moeforge::error; tests/test_llama2c.cpp checks the
          messages on the real model).
Run it again after adding an input here; the output is deterministic.
"""
import json
import os
import struct
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    os.makedirs(os.path.join(root, target), exist_ok=True)
    with open(os.path.join(root, target, name), "wb") as f:
        f.write(data)


# safetensors: [u64 LE header length][JSON][data]
def st(tensors, metadata=None, pad=True):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


f32 = lambda *v: struct.pack("<%df" % len(v), *v)
u16 = lambda *v: struct.pack("<%dH" % len(v), *v)
put("fuzz_safetensors", "seed-empty", st([]))
put("fuzz_safetensors", "seed-meta", st([], {"format": "pt"}, pad=False))
put("fuzz_safetensors", "seed-mixed", st([("w", "F32", [2, 3], f32(1, -2.5, 3, 0, 65504, 1e-40)),
                                          ("h", "F16", [4], u16(0x3c00, 0xc100, 0x7bff, 0x0001)),
                                          ("b", "BF16", [2, 1], u16(0x3f80, 0xc020)),
                                          ("s", "F32", [], f32(7)),
                                          ("z", "F32", [0, 5], b"")], {"format": "pt"}))


# llama2.c checkpoint: selector byte 0, then 7 int32 and the FP32 arrays.
def header(dim, hidden, layers, heads, kv, vocab, seq):
    return b"\0" + struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)


def ckpt(dim, hidden, layers, heads, kv, vocab, seq, tied=True):
    hs = dim // heads
    kv_dim = hs * kv
    n = vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim) + dim + seq * hs
    if not tied:
        n += vocab * dim
    return header(dim, hidden, layers, heads, kv, vocab if tied else -vocab, seq) + f32(*[((i * 37) % 17 - 8) / 8.0 for i in range(n)])


put("fuzz_llama2c", "seed-ckpt-tied", ckpt(4, 6, 1, 2, 1, 5, 3))
put("fuzz_llama2c", "seed-ckpt-untied", ckpt(4, 4, 2, 2, 2, 3, 2, tied=False))
# vocab_size INT32_MIN was negated (signed overflow) to mean "untied".
put("fuzz_llama2c", "finding-vocab-int-min", header(64, 172, 5, 8, 4, -2**31, 512) + f32(*[0.5] * 64))
# Dimensions whose implied size overflowed 64 bits passed the size check.
put("fuzz_llama2c", "finding-size-overflow", header(1 << 24, 1 << 24, 1 << 24, 1 << 23, 1 << 23, 512, 512) + f32(*[0.5] * 64))


# tokenizer: selector byte 1, u16 (vocab - 1), then max_len and per token score, length, bytes.
def tok(pieces, vocab=None):
    body = struct.pack("<i", max(len(p) for p in pieces))
    for i, p in enumerate(pieces):
        body += struct.pack("<fi", -float(i), len(p)) + p
    return b"\1" + struct.pack("<H", (vocab or len(pieces)) - 1) + body


pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)] + [b" ", b"on", b"ce", b" on", b"once", b" once", b"a", b"t"]
put("fuzz_llama2c", "seed-tok-small", tok(pieces))
# A vocabulary too small for the 256 byte tokens: encoding a byte read past it.
put("fuzz_llama2c", "finding-tok-no-byte-fallback", tok(pieces[:100]))
# A piece like <0xZZ> was parsed as a byte token.
put("fuzz_llama2c", "finding-tok-bad-hex", tok(pieces[:3] + [b"<0xZZ>"] + pieces[4:]))
print("wrote", root, file=sys.stderr)
