"""A challenge server: participants upload `attack.npy` submissions over HTTP, scorers check and
score them with the same code as `run_attack.py`, and a leaderboard shows the strongest attacks.

- `database.py`: the tables (participants, uploads, submissions and their queue, file chunks,
  settings), on SQLite in the state folder or on PostgreSQL, through SQLAlchemy Core;
- `participants.py`: participants and their tokens, stored hashed;
- `storage.py`: where accepted files live (the state folder, or the database);
- `queue.py`: the rate limit, accepting a submission, claiming jobs under a lease, results, the
  leaderboard;
- `uploads.py`: receiving a multipart upload into a spool file under a size limit, and the
  submission checks of `common.evaluation.submission` with the participant's file name;
- `scorer.py`: the loop that claims jobs and scores them;
- `web.py`: the Starlette application, its JSON API and its pages (`templates/`);
- `connections.py`: uvicorn's protocol under caps on connections and deadlines on requests, and
  the log's rate limit;
- `access.py`: the access log, without secrets;
- `proxy.py`: the nginx site to put in front.

The library prints nothing and writes only into the state folder and the database it is given;
`common/scripts/serving.py` (each challenge's `serve.py`) reads the flags and starts it.
"""
