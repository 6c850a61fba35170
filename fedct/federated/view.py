"""What a federated run shows while it runs: a live table on a terminal, a line per round elsewhere.

On a terminal the table holds the last rounds (val metrics, epsilon, seconds; the best round
marked) and the clients of the round in progress (waiting, training, done, sat out, rejected).
In logs (CI, `flwr run --stream`, pipes) a live display would only print its last frame, so
the view falls back to one line per round.
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from fedct.operating_point import threshold_story

SHOWN_ROUNDS = 12


def _number(value, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


class RoundView:
    """Feed it round and client events; it renders them live or prints a line per round."""

    def __init__(self, console: Console, *, rounds: int, dp: bool, live: bool | None = None,
                 client_lines: bool = False, federated: bool = False, classes: int = 2,
                 scored: bool = True):
        self.console = console
        self.scored = scored  # False for objective byol: no labels, so only the loss
        self.argmax = classes > 2  # no threshold: argmax accuracy and balanced accuracy
        # which val the run selects on: its columns are shown (fed_* or the pooled val_*)
        self.prefix = "fed" if federated else "val"
        self.client_lines = client_lines  # without a live table: a line as each client answers
        self.rounds = rounds
        self.dp = dp
        self.live_enabled = console.is_terminal and not console.quiet if live is None else live
        self.rows: list[dict] = []
        self.best_round = 0
        self.current = 0
        self.clients: dict[int, dict] = {}
        self._live: Live | None = None

    def __enter__(self) -> RoundView:
        if self.live_enabled:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def start_round(self, round_number: int, clients: list[int]) -> None:
        self.current = round_number
        self.clients = {k: {"status": "waiting"} for k in clients}
        if self.client_lines and self._live is None:
            self.console.print(f"round {round_number}/{self.rounds}: training on clients "
                               f"{', '.join(map(str, clients))}", highlight=False)
        self._refresh()

    def client_started(self, client_id: int) -> None:
        self.clients.setdefault(client_id, {}).update(status="training", started=time.perf_counter())
        self._refresh()

    def client_finished(self, reply) -> None:
        entry = self.clients.setdefault(reply.client_id, {})
        started = entry.get("started")
        update = reply.update
        entry.update(status=reply.status, detail=reply.detail, epsilon=reply.epsilon,
                     steps=update.metrics.get("steps") if update is not None else None,
                     examples=update.examples if update is not None else None,
                     loss=update.metrics.get("train_loss") if update is not None else None,
                     seconds=time.perf_counter() - started if started else None)
        if self.client_lines and self._live is None:
            self.console.print(
                f"  client {reply.client_id}: {reply.status}"
                + (f", {entry['examples']} examples, {entry['steps']} steps, loss "
                   f"{_number(entry['loss'])}" if update is not None else f" ({reply.detail})")
                + (f", epsilon {reply.epsilon:.2f}" if reply.epsilon is not None else ""),
                highlight=False)
        self._refresh()

    def message(self, text: str) -> None:
        """A notice (a client sat out, an update was rejected): printed above the live table."""
        self.console.print(text, highlight=False)

    def round_finished(self, row: dict, *, best_round: int) -> None:
        self.rows.append(row)
        self.best_round = best_round
        if self._live is not None:
            self._refresh()
            return
        if not self.scored:
            self.console.print(f"round {row['round']}/{self.rounds}: {row['clients']} clients, "
                               f"BYOL loss {row['train_loss']:.3f} ({row['seconds']:.1f}s)",
                               highlight=False)
            return
        self.console.print(
            f"round {row['round']}/{self.rounds}: {row['clients']} clients, "
            f"train loss {row['train_loss']:.3f}, "
            f"{threshold_story('fed val' if self.prefix == 'fed' else 'val', row)}"
            + (f", max epsilon {row['max_epsilon']:.2f}" if self.dp else "")
            + f" ({row['seconds']:.1f}s)", highlight=False)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Group:
        val = "federated val" if self.prefix == "fed" else "val"
        caption = ("loss: the clients' mean BYOL loss (no labels read)" if not self.scored else
                   f"on {val}: the class of highest probability; AUC macro one-vs-rest; "
                   "bal acc = mean recall; * best round" if self.argmax else
                   f"on {val}: acc@.5 at threshold 0.5; acc, sens, spec at the threshold thr "
                   "chosen on it; * best round")
        rounds = Table(title=f"rounds ({len(self.rows)}/{self.rounds} done)", title_justify="left",
                       box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 0, 0, 1),
                       caption=caption, caption_justify="left")
        names = ("round", "n", "loss", "AUC", "acc", "bal acc") if self.argmax else \
            ("round", "n", "loss", "AUC", "acc@.5", "thr", "acc", "sens", "spec")
        names = names if self.scored else ("round", "n", "loss")
        for name in names:
            rounds.add_column(name, justify="right")
        if self.dp:
            rounds.add_column("eps", justify="right")
        rounds.add_column("s", justify="right")
        for row in self.rows[-SHOWN_ROUNDS:]:
            cells = [f"{row['round']}{' *' if row['round'] == self.best_round else ''}",
                     str(row["clients"]), _number(row["train_loss"])]
            if self.scored:
                cells += [_number(row[f"{self.prefix}_auc"]), _number(row[f"{self.prefix}_acc"])]
                cells += [_number(row[f"{self.prefix}_balanced_acc"])] if self.argmax else [
                    _number(row["threshold"]), _number(row["thr_acc"]),
                    _number(row["thr_sensitivity"]), _number(row["thr_specificity"])]
            if self.dp:
                cells.append(_number(row["max_epsilon"], 2))
            cells.append(_number(row["seconds"], 1))
            rounds.add_row(*cells)
        clients = Table(title=f"round {self.current} clients", title_justify="left",
                        box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for name in ("client", "status", "examples", "steps", "loss", "epsilon", "s"):
            clients.add_column(name, justify="right")
        for client_id, entry in sorted(self.clients.items()):
            clients.add_row(str(client_id), entry.get("status", ""),
                            str(entry.get("examples") or "-"), str(entry.get("steps") or "-"),
                            _number(entry.get("loss")), _number(entry.get("epsilon"), 2),
                            _number(entry.get("seconds"), 1))
        return Group(rounds, clients) if self.clients else Group(rounds)
