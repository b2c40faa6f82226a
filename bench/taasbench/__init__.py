"""The TAAS benchmark as a package: bench/bench.py is its command line (started by bench/run.sh),
bench/conncost.py and bench/profile_extra.py reuse its set-up.

- config: paths, peers, backends, cases;
- procs: processes, /proc readings, bounded waits;
- peers: the backends and the peers in front of them;
- load: the rounds and each case's load tool;
- taas_cases: 307/s, registrations/s, parked connections;
- report: the markdown table.
"""

from .load import Load
from .peers import Peers
from .procs import Procs, cpu_seconds, status_kib, until
from .taas_cases import TaasCases


class Bench(Peers, Load, TaasCases):
    """One run: its processes, ports and raw records (raw.jsonl)."""


__all__ = ["Bench", "Procs", "cpu_seconds", "status_kib", "until"]
