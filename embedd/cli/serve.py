"""``embedd serve``: the daemon's logging (stderr, an optional rotating file, quieted libraries) and its run to the end."""

from __future__ import annotations

import argparse
import importlib
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from embedd.allocator import AllocatorMissing, adopt
from embedd.settings import SettingsInvalid, check_device, settings_from_args

__all__ = ["cmd_serve"]


def configure_logging(level: str, log_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(log_dir / "embedd.log", maxBytes=10 * 2**20, backupCount=3)
        )
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    # Libraries that narrate their own start-up at INFO (faiss inside Milvus Lite).
    for chatty in ("faiss", "faiss.loader"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # pymilvus logs every refused call with a traceback, including the ones the store
    # expects and handles (a server refusing MERT's width, reconnects while Milvus is
    # down); Milvus Lite's in-process gRPC server logs each call it does not implement.
    # The store turns real failures into contract errors that we log ourselves.
    # pymilvus configures its own logger when imported (logging.config.dictConfig in
    # pymilvus.settings), which would undo the levels below: import it first.
    importlib.import_module("pymilvus")
    for noisy in ("pymilvus", "pymilvus.milvus_client", "grpc"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    # muq 0.1.0 loads its text tower with XLMRobertaModel.from_pretrained(trust_remote_code=True);
    # transformers warns at every MuQ-MuLan load that the flag has no effect there. Only that
    # notice is dropped: the same logger's other warnings (missing weights...) still count.
    logging.getLogger("transformers.modeling_utils").addFilter(_not_the_trust_remote_code_notice)
    # The daemon writes nothing to stdout; libraries do (huggingface_hub prints "Loading
    # weights from local directory" at every MuQ-MuLan load). Their lines go to the log at
    # DEBUG instead of the journal; process-wide, as swapping stdout around one call from
    # the model threads would not be thread-safe.
    sys.stdout = LogStream(logging.getLogger("embedd.stdout"), logging.DEBUG)


def _not_the_trust_remote_code_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("The argument `trust_remote_code` is to be used with Auto classes")


class LogStream:
    """A text stream whose lines become log records (the serving daemon's ``sys.stdout``)."""

    encoding = "utf-8"

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger = logger
        self._level = level

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._logger.log(self._level, "%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        check_device(settings)
        adopt(settings.allocator)  # may re-execute this process, once, with the allocator preloaded
    except (SettingsInvalid, AllocatorMissing) as exc:
        print(f"embedd: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_dir)

    import uvloop

    from embedd.server import Server, StartupError

    try:
        uvloop.run(Server(settings).serve())
    except StartupError as exc:
        print(f"embedd: {exc}", file=sys.stderr)
        return 1
    # Shutdown is complete: the job is checkpointed, the socket removed. Exit now
    # rather than let the interpreter join threads still inside torch or a Milvus
    # call (a forward pass cut short at finalisation aborts the process).
    # os._exit skips the interpreter's exit hooks, multiprocessing's among them: the
    # decoder pool's named semaphores (its queues' locks) would stay registered, and
    # multiprocessing's resource tracker would unlink them and warn "There appear to be
    # 5 leaked semaphore objects" at every stop. Run the finalizers that hook runs first.
    import multiprocessing.util

    multiprocessing.util._run_finalizers(0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
