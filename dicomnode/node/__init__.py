"""The node: composition root and process runtime, nothing else.

* :mod:`dicomnode.node.node` -- :class:`Node` / :func:`run_node` (``dicomnode serve``:
  open + migrate the store, reconcile, start receiving and the services, stop); the
  completeness tracker.
* :mod:`dicomnode.node.workers` -- the worker and dispatcher processes as services,
  and :func:`run_workers` (``dicomnode worker``); imported only when workers run.
* :mod:`dicomnode.node.supervisor` -- the ONE spawn / restart-with-backoff / stop
  policy for every child process, the release of a dead child's work per child kind,
  the heap freeze and the signal runner.
* :mod:`dicomnode.node.receivers` -- connection hand-off (SCM_RIGHTS) to the
  receiving processes, and their entry point.
* :mod:`dicomnode.node.children` -- the worker and dispatcher processes' entry points.

Nothing is imported here: a spawned receiving process imports
:mod:`dicomnode.node.receivers` (the SCP and the store), not the worker and model
runtime that :mod:`dicomnode.node.node` pulls in (measured: 0.6 s instead of 1.0 s
to import, and the memory of the model runtime's modules in every receiver).
"""
