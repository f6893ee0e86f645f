"""What the served models say of themselves, as `/` and the bench report it."""

# `head_screen` of an fp32 generator on the CPU: on or off by the timings at load (server/ml/screen.py).
SCREEN = r"(on for greedy one-row steps|off) \(one row: [\d.]+ ms screened against [\d.]+ ms for the full head\)$"
