"""The scorer: claims jobs from the queue and scores them with `run_attack.py`'s own code
(`Rules.check`, then `common.evaluation.submission.score`), on the model it was given.

While it scores a job, a thread renews the job's lease (every third of the lease) and logs the
progress; should the scorer stop answering, the lease runs out and another scorer takes the job.
A result is written only while the scorer's claim still holds, so a job is scored once.
"""

import logging
import os
import secrets
import socket
import threading
import time

import numpy as np
import sqlalchemy as sa

from common.evaluation import submission
from common.io import download
from common.runtime.errors import UserError
from common.serving import queue, storage

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
RETRY_SECONDS = 5
PROGRESS_SECONDS = 30
RENEW_SECONDS = 10


def _reason(error):
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Scorer:
    """Scores the jobs of `db` (files in `store`, copied into `work_dir` where needed) against
    `rules`, on `model` (whose fingerprint is `fingerprint`) under `strategy`, `batch_size`
    images at a time (run_attack.py's); `public` holds the indices of the public test images
    (None: no private split)."""

    def __init__(self, db, store, work_dir, rules, model, strategy, batch_size, fingerprint,
                 public, lease_seconds):
        self.db, self.store, self.work_dir, self.rules = db, store, work_dir, rules
        self.model, self.strategy, self.batch_size = model, strategy, batch_size
        self.fingerprint, self.public = fingerprint, public
        self.lease_seconds = lease_seconds
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.current = None  # the job being scored
        self.stopping = False  # set by give_back: results are no longer written
        self.retired = None  # why it stopped for good: the challenge moved to another model
        self._lock = threading.Lock()

    def _score(self, x):
        """The queue.Score of the model on the images `x`."""
        _, predictions = submission.score(self.model, x, self.rules.labels, self.batch_size,
                                          self.strategy)
        correct = predictions == self.rules.labels
        if self.public is None:
            accuracy = float(np.mean(correct))
            return queue.Score(accuracy, accuracy, None)
        private = np.ones(len(correct), dtype=bool)
        private[self.public] = False
        return queue.Score(float(np.mean(correct)), float(np.mean(correct[self.public])),
                           float(np.mean(correct[private])))

    def measure_reference(self):
        """Stores the model's clean accuracy on the test images (the leaderboard's reference
        row), keyed by the model's fingerprint, unless it is stored already for this number of
        images."""
        examples = int(len(self.rules.images))
        stored = queue.get_reference(self.db, self.fingerprint)
        if stored and stored.get("examples") == examples:
            return stored
        start = time.monotonic()
        log.info("measuring the clean accuracy of model %s on %d test images",
                 self.fingerprint[:12], examples)
        score = self._score(self.rules.images)
        reference = {"examples": examples, "accuracy": score.accuracy, "public": score.public,
                     "private": score.private}
        queue.set_reference(self.db, self.fingerprint, reference)
        log.info("clean accuracy of model %s: %.2f%% (%.1f s)", self.fingerprint[:12],
                 100 * score.accuracy, time.monotonic() - start)
        return reference

    def run(self, stop):
        """Scores jobs until the threading.Event `stop` is set."""
        self.measure_reference()
        log.info("scorer %s waiting for jobs (lease %d s)", self.name, self.lease_seconds)
        while not stop.is_set():
            try:
                job = queue.claim(self.db, self.name, self.lease_seconds, self.fingerprint)
            except queue.ModelChanged as changed:
                self.retired = str(changed)
                log.error("%s: it stops (start it with the challenge's model)", changed)
                return
            except sa.exc.SQLAlchemyError as error:
                log.error("cannot reach the database to claim a job: %s; trying again in %d s",
                          _reason(error), RETRY_SECONDS)
                stop.wait(RETRY_SECONDS)
                continue
            if job is None:
                stop.wait(POLL_SECONDS)
            else:
                self.score(job)

    def score(self, job):
        """Scores the claimed `job` and writes its result."""
        with self._lock:
            self.current = job
        taken = f", taken over from {job.taken_from}" if job.taken_from else ""
        log.info("scoring %s of %s (%s, %s, %.1f MB stored), attempt %d%s", job.id,
                 job.participant, job.track, job.filename, job.stored_size / 1e6, job.attempts,
                 taken)
        done, lost = threading.Event(), threading.Event()
        keeper = threading.Thread(target=self._keep_lease, args=(job, done, lost),
                                  name=f"lease {job.id}", daemon=True)
        keeper.start()
        start = time.monotonic()
        try:
            score, error = self._result(job)
        except Exception:  # a broken scorer, not a bad file: logged, the job retried
            log.exception("scoring %s failed; it goes back to the queue", job.id)
            done.set()
            self._give_back(job, counted=True)
            return
        finally:
            done.set()
            keeper.join()
        seconds = time.monotonic() - start
        if self.stopping:
            return  # given back to the queue meanwhile
        if lost.is_set() or not self._finish(job, score, error):
            log.warning("%s was taken over by another scorer (its lease ran out): this result "
                        "is dropped", job.id)
        elif error is None:
            log.info("scored %s: accuracy %.2f%% (%.1f s)", job.id, 100 * score.accuracy,
                     seconds)
        else:
            log.info("rejected %s: %s", job.id, error)
        with self._lock:
            self.current = None

    def _finish(self, job, score, error):
        deadline = time.monotonic() + self.lease_seconds
        while True:
            try:
                return queue.finish(self.db, job, self.fingerprint, score, error)
            except sa.exc.SQLAlchemyError as error_:
                if time.monotonic() > deadline:
                    raise
                log.error("cannot write the result of %s: %s; trying again", job.id,
                          _reason(error_))
                time.sleep(1)

    def _result(self, job):
        """(the queue.Score, None) or (None, the error that rejects the submission)."""
        start = time.monotonic()
        with self.store.opened(job.id, self.work_dir) as path:
            if download.sha256_of(path) != job.stored_sha256:
                return None, "the stored file differs from the one kept (its SHA-256 changed)"
            with storage.expanded(path, self.work_dir) as plain:
                try:
                    x_adv = self.rules.check(plain, job.filename)
                except UserError as error:
                    return None, str(error)
        log.info("checked %s (%.1f s); predicting %d images", job.id, time.monotonic() - start,
                 len(x_adv))
        return self._score(x_adv), None

    def _keep_lease(self, job, done, lost):
        """Renews the lease every third of it (at least every RENEW_SECONDS) and logs progress
        every PROGRESS_SECONDS, until `done`; sets `lost` where the claim went to another
        scorer or could not be renewed in time."""
        start = last_report = time.monotonic()
        renewed = start
        while not done.wait(min(self.lease_seconds / 3, RENEW_SECONDS)):
            now = time.monotonic()
            try:
                if not queue.renew(self.db, job, self.lease_seconds):
                    lost.set()
                    return
                renewed = now
            except sa.exc.SQLAlchemyError as error:
                log.error("cannot renew the lease of %s: %s", job.id, _reason(error))
                if now - renewed > self.lease_seconds:
                    lost.set()
                    return
            if now - last_report >= PROGRESS_SECONDS:
                log.info("still scoring %s (%.0f s)", job.id, now - start)
                last_report = now

    def give_back(self):
        """Puts the job being scored, if any, back in the queue (the server is stopping)."""
        with self._lock:
            self.stopping = True
            job, self.current = self.current, None
        if job is not None:
            self._give_back(job, counted=False)

    def _give_back(self, job, counted):
        with self._lock:
            if self.current is job:
                self.current = None
        try:
            if queue.release(self.db, job, counted):
                log.info("%s is back in the queue", job.id)
        except sa.exc.SQLAlchemyError as error:
            log.error("cannot put %s back in the queue (%s): another scorer takes it when its "
                      "lease runs out", job.id, _reason(error))
