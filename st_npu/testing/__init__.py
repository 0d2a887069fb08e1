"""Test helpers for st_npu, chiefly a CPU-backed emulated ``npu`` device (see ``st_npu.emulator.backend``)."""
