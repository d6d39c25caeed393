"""More ways in than HTTP: asynchronous invocations through a durable queue, schedules, and
queue triggers whose consumers live in the daemon. All of them end in the same scheduler as
HTTP requests, through one seam: :class:`hourai.invocations.runner.InvokeEvent`."""
