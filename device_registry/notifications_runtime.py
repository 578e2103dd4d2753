"""The notification sender's place in the app: started by the channels router's lifespan.

Router lifespans nest in inclusion order (module names): ``channels`` comes before
``commands``, so the sender runs when the command tracker starts, and the tracker wakes
it after each commit that enqueued deliveries (``rules_runtime``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from device_registry.notifications import NotificationSender

STATE_ATTR = "notification_sender"


@asynccontextmanager
async def sender_lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state.registry
    if not state.settings.notifications.send:
        logging.getLogger("registry.notifications").info(
            "notification sending is off (IOTFLEET_NOTIFICATIONS__SEND=false): deliveries wait in the outbox"
        )
        yield
        return
    sender = NotificationSender(state.settings.notifications, state.sessions, state.registry)

    async def stop(_lost: bool) -> None:
        await sender.stop()

    # Sends in the lease holder only (one claimer of the outbox); waking it elsewhere is a no-op.
    state.work.register("notification sender", sender.start, stop)
    setattr(app.state, STATE_ATTR, sender)
    try:
        yield
    finally:
        setattr(app.state, STATE_ATTR, None)
        await sender.stop()


def running_sender(app: FastAPI) -> NotificationSender | None:
    sender: NotificationSender | None = getattr(app.state, STATE_ATTR, None)
    return sender


def wake_sender(request: Request) -> None:
    """After a commit that enqueued deliveries: send them now rather than at the next poll."""
    sender = running_sender(request.app)
    if sender is not None:
        sender.wake()
