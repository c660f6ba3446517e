"""What `covspec device run` and `covspec device chat` build from their shared options
(``device_cmd.OPTIONS``): the generation settings and drafting options, the loaded
artifact, the image, the client and the trace. Every bad value becomes a click error
that says what to fix, before anything connects. Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from covspec.families.chat import ConversationError
from covspec.protocol.manifest import ArtifactError
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import Backoff, CurveKeys, EdgeClient, EdgeError, EdgeUnreachable
from covspec.runtime_device.conversation import Conversation
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.preprocess import ImageError, load_image
from covspec.runtime_device.stats import trace_to_file


def device_pacing(regime: str | None):
    """The draft's pacing under ``regime`` (none without one); BadParameter for a bad regime."""
    from covspec.regime import RegimeError
    from covspec.regime import device_pacing as pacing_for

    try:
        return pacing_for(regime)
    except RegimeError as exc:
        raise click.BadParameter(str(exc), param_hint="--regime") from None


@dataclass
class DeviceSetup:
    settings: GenerationSettings
    options: DraftingOptions
    artifact: DraftArtifact
    client: EdgeClient
    image_bytes: bytes
    trace: Callable[[dict], None] | None
    close_trace: Callable[[], None]

    # What ends an answer with a message instead of a traceback (ArtifactError: preprocessing vs graph).
    errors = (EdgeUnreachable, EdgeError, ArtifactError, ConversationError)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "DeviceSetup":
        v = values
        try:      # settings first: nothing is loaded for a request that cannot run
            settings = GenerationSettings(max_new_tokens=v["max_new_tokens"], temperature=v["temperature"],
                                          top_k=v["top_k"], top_p=v["top_p"], seed=v["seed"],
                                          prune_target=v["prune_target"])
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        if (v["key_file"] is None) != (v["edge_key_file"] is None):
            raise click.UsageError("--key and --edge-key come together: both are needed to encrypt the link.")
        try:
            curve = CurveKeys.load(v["key_file"], v["edge_key_file"]) if v["key_file"] else None
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot read the keys ({exc}).", param_hint="--key/--edge-key") from None
        image_bytes = read_image(v["image_file"])
        try:
            artifact = DraftArtifact.load(v["artifacts_dir"], threads=v["threads"], lean=v["memory"] == "lean",
                                          pacing=device_pacing(v["regime"]))
        except ArtifactError as exc:
            raise click.ClickException(str(exc)) from None
        options = DraftingOptions(lead=v["lead"], policy=v["draft_policy"], draft_len=v["draft_len"],
                                  max_draft_len=v["max_draft_len"], pipeline=v["pipeline"],
                                  max_in_flight=v["max_in_flight"], branches=v["branches"], wire=v["wire"],
                                  keep_ratio=v["keep_ratio"], keep_tokens=v["keep_tokens"], selection=v["selection"],
                                  reselect=v["reselect"])
        if v["prune_target"]:
            click.secho("warning: --prune-target is not exact; the answer may differ from the target's own.",
                        fg="yellow", err=True)
        trace, close_trace = trace_to_file(v["trace_file"]) if v["trace_file"] else (None, lambda: None)
        client = EdgeClient(v["edge"], Backoff(timeout_s=v["timeout"], retries=v["retries"]), curve)
        return cls(settings, options, artifact, client, image_bytes, trace, close_trace)

    def conversation(self, image_bytes: bytes | None = None) -> Conversation:
        """A new conversation about ``image_bytes`` (default: the --image)."""
        return Conversation(CoInference(self.artifact, self.client), image_bytes or self.image_bytes, self.settings,
                            self.options)

    def close(self) -> None:
        self.client.close()
        self.close_trace()


def read_image(path: Path, option: str = "--image") -> bytes:
    """The bytes of an image file that decodes; click errors (naming ``option``) otherwise."""
    if not path.is_file():
        raise click.BadParameter(f"{path} does not exist.", param_hint=option)
    data = path.read_bytes()
    try:
        load_image(data)
    except ImageError as exc:
        raise click.ClickException(str(exc)) from None
    return data
