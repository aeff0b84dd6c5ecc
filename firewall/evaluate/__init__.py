"""`firewall evaluate`: a red-team and cost report against any live Open Inference Protocol endpoint.

    firewall evaluate --target HOST:PORT --model NAME [--baseline HOST:PORT] --data PATH [--alerts FILE]

Modules: ``data`` (held-out images), ``endpoint`` (tritonclient adapters for a firewall and a bare
model server), ``benign``, ``patterns`` (benign traffic patterns, also usable in process),
``benign_phase``, ``attacks`` (ART), ``cost``, ``alerts`` (the alert log), ``report``.
Needs the ``[eval]`` extra (ART, matplotlib, tqdm, tritonclient).
"""

from firewall.evaluate.command import configure_cli, run_cli

__all__ = ["configure_cli", "run_cli"]
