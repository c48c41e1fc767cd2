"""Secure aggregation as a fold: the key exchange when the round starts, each masked vector handed to the
protocol's server as it arrives, the unmasking exchange and the field sum when the round ends.

The protocol (``fedfm.privacy.secagg``) keeps every accepted masked vector until the survivors are known (a
client that sends twice is dropped and its first vector taken out again); they stay in the round's spool, within
its memory budget. Too few valid masked inputs, or secrets that cannot be recovered, skip the round.
"""

from __future__ import annotations

import logging
import time

from fedfm.aggregators.base import Aggregate, FoldContext
from fedfm.errors import RoundSkipped
from fedfm.privacy.aggregate import SECAGG_KEY, TAIL, PrivateAggregator, session_id, unflatten
from fedfm.privacy.secagg import SecAggError, SecAggParams, SecAggServer, decode_fixed, secagg_plus_neighbours
from fedfm.types import ClientUpdate

log = logging.getLogger("fedfm")


class SecureFold:
    """One round of secure aggregation (with or without DP) on the server."""

    def __init__(self, private: PrivateAggregator, ctx: FoldContext):
        self.private, self.ctx, self.sa = private, ctx, private.sa
        self.traffic = [0, 0]  # protocol bytes down, up
        self.rejected: list[dict] = []
        self.count = 0
        self.masking = 0.0  # the clients' own fixed-point encoding and masking time
        t0 = time.perf_counter()
        self.server = self._key_exchange()
        self.seconds = time.perf_counter() - t0

    def _params(self, participants: int) -> SecAggParams:
        k = self.sa.neighbours
        if k == "auto":
            k = secagg_plus_neighbours(participants, self.private.cfg.federation.dropout, self.sa.threshold)
        return SecAggParams(
            frac_bits=self.sa.frac_bits,
            neighbours=min(k, participants - 1) if k is not None else None,
            threshold=self.sa.threshold,
            min_survivors=self.private.cfg.federation.min_clients,
        )

    def _key_exchange(self) -> SecAggServer:
        members, length = self.ctx.members, self.private.length
        session = session_id(self.private.cfg.seed, self.ctx.round, members)
        params = self._params(len(members))
        spool = self.ctx.spool() if self.ctx.spool is not None else None
        server = SecAggServer(session, params, members, length, graph_seed=session,
                              seen_digests=self.private.seen_digests, spool=spool)
        # the round's setup: session, vector length and graph degree (0 = complete), all public
        setup = session + length.to_bytes(8, "little") + (params.neighbours or 0).to_bytes(4, "little")
        self._exchange("secagg_advertise", [(i, setup) for i in members], server.receive_advert)
        rosters = server.rosters()
        self._exchange("secagg_share_keys", sorted(rosters.items()), server.receive_shares)
        inboxes = server.inboxes()
        self._exchange("secagg_receive_shares", sorted(inboxes.items()), None)
        return server

    def _exchange(self, fn: str, jobs, receive) -> None:
        replies, down, up = self.ctx.engine.call(fn, jobs)
        self.traffic[0] += down
        self.traffic[1] += up
        if receive is None:
            return
        for cid, msg in sorted(replies.items()):
            reason = receive(cid, msg)
            if reason:
                log.warning("round %d: secure aggregation dropped client %s at %s: %s", self.ctx.round, cid, fn, reason)

    def add(self, update: ClientUpdate) -> None:
        """A masked update as it arrives: its format checked, then handed to the protocol (or rejected)."""
        t0 = time.perf_counter()
        msg = update.delta.get(SECAGG_KEY)
        index = update.metrics.get("client_index")  # set by the engine from the client it asked (Flower: the node)
        reason = "no masked vector in the update" if msg is None or len(update.delta) != 1 else None
        if reason is None and (not isinstance(index, int) or index not in self.ctx.members):
            reason = f"client index {index!r} is not one of this round's clients"
        reason = reason or self.server.receive_masked(index, msg.numpy().tobytes())
        self.seconds += time.perf_counter() - t0
        self.masking += update.metrics.get("mask_seconds", 0.0)
        if reason:
            log.warning("round %d: rejected masked update from %s: %s", self.ctx.round, update.client, reason)
            self.rejected.append({"client": update.client, "reason": reason})
        else:
            self.count += 1

    def result(self) -> Aggregate:
        t0 = time.perf_counter()
        try:  # too few valid masked inputs stop here, before any unmasking share is asked for
            requests = self.server.unmask_requests()
            self._exchange("secagg_unmask", sorted(requests.items()), self.server.receive_unmask)
            field_sum = self.server.result()
        except SecAggError as exc:
            raise RoundSkipped(f"round {self.ctx.round}: secure aggregation cannot recover the sum: {exc}") from None
        finally:
            self.server.close()
        vector = decode_fixed(field_sum, self.sa.frac_bits)
        body, tail = vector[:-TAIL], vector[-TAIL:]
        total = unflatten(body, self.private.reference)
        reporters = len(self.server.survivors)
        if self.private.dp.active:
            agg = self.private.finish(self.ctx, total, float(reporters), float(tail[0]), reporters)
        else:
            agg = self.private.finish(self.ctx, total, float(tail[0]), 0.0, reporters)
            agg.mean_loss = float(tail[1]) / reporters  # the clients' mean loss, as the plain path reports it
        agg.rejected += self.rejected
        agg.info.update(
            # the server's protocol work plus every client's fixed-point encoding and masking
            secagg_time_s=self.seconds + (time.perf_counter() - t0) + self.masking,
            secagg_dropped=len(self.server.dropped),
            secagg_bytes=self.traffic[0] + self.traffic[1],
        )
        agg.bytes_down = self.traffic[0]
        return agg
