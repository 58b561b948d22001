"""Risk: the risk matrix (likelihood from the tests crossed with harm from the catalogue) and the release gate.

Both read only the ``report.json`` dictionary, so a finished run can be re-assessed (``ehrmem gate RUN``).
"""

from ehrmem.risk.gate import GateThresholds, Verdict, evaluate_gate
from ehrmem.risk.matrix import HARM_OF_TIER, LEVELS, RISK_MATRIX, UNDETERMINED, risk_matrix

__all__ = [
    "HARM_OF_TIER",
    "LEVELS",
    "RISK_MATRIX",
    "UNDETERMINED",
    "GateThresholds",
    "Verdict",
    "evaluate_gate",
    "risk_matrix",
]
