"""The decision layer: pure code shared by the live controller and the simulator.

Nothing here imports SGLang, ZMQ or Prometheus (a test enforces it): inputs arrive as plain values
and as the event types of `events`, so every rule, mirror and ledger can be driven by simulated
ranks exactly as by real ones.
"""
