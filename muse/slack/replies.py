"""What the bot says: usage, "queued", upload comments and every failure. Pure functions of their inputs."""

from __future__ import annotations

from muse.errors import MuseError
from muse.messages import GenerateRequest
from muse.model_info import ModelInfo
from muse.schema import QUALITY_STEPS
from muse.words import Kind, in_words

# Slack's "not a member" answers, from chat.postEphemeral, files.completeUploadExternal and conversations.info.
NOT_IN_CHANNEL = {"not_in_channel", "channel_not_found"}
PROMPT_SHOWN = 200


def escape(text: str) -> str:
    """Slack mrkdwn control characters; without this a prompt could write `<!channel>` and ping everyone."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def shown(prompt: str) -> str:
    prompt = " ".join(prompt.split())
    if len(prompt) > PROMPT_SHOWN:
        prompt = prompt[: PROMPT_SHOWN - 1] + "…"
    return f"_{escape(prompt)}_"


def usage(command: str = "/muse", model: ModelInfo | None = None) -> str:
    """How to use the command, with the served model's own presets and options (no --negative for a model
    without negative conditioning) and one of its example prompts."""
    fast, quality = (model.steps, model.quality_steps) if model else (QUALITY_STEPS["fast"], QUALITY_STEPS["quality"])
    negative = model is None or model.negative_prompt
    example = model.prompts.examples[0] if model and model.prompts.examples else "a lighthouse at dusk, oil painting"
    lines = [
        f"*{command} <prompt> [options]* makes an image from a text prompt and posts it in this channel.",
        f"• `--fast` ({fast} steps, the default) or `--quality` ({quality} steps)",
        "• `--seed N`: the same prompt and seed give the same image",
        "• `--n K`: K images at once (seeds N, N+1, …)",
        *(['• `--negative "…"`: what to keep out of the image'] if negative else []),
        "• `--steps N`: an exact number of denoising steps",
        f"Example: `{command} {example} --seed 7" + (' --negative "people"`' if negative else "`"),
    ]
    return "\n".join(lines)


def invalid(problem: str, command: str = "/muse") -> str:
    return f":warning: {escape(problem)}. See `{command} help`."


def steps_label(request: GenerateRequest) -> str:
    names = {steps: name for name, steps in QUALITY_STEPS.items()}
    name = names.get(request.steps)
    return f"{name}, {request.steps} steps" if name else f"{request.steps} steps"


def seeds_label(request: GenerateRequest) -> str:
    seeds = request.seeds()
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]} to {seeds[-1]}"


def queued(request: GenerateRequest, position: int | None) -> str:
    """`position`: images queued ahead of this one; None once a worker has it."""
    images = "1 image" if request.n == 1 else f"{request.n} images"
    if position is None:
        where = "starting now"
    elif position == 0:
        where = "queued, next in line"
    else:
        where = f"queued behind {position} image{'s' if position != 1 else ''}"
    return (
        f":hourglass_flowing_sand: {shown(request.prompt)} ({images}, {seeds_label(request)}): {where}. "
        "I'll post it here when it's ready."
    )


def comment(request: GenerateRequest, user: str) -> str:
    """The message above the uploaded image(s): prompt, seed and who asked."""
    parts = [seeds_label(request), steps_label(request)]
    if request.negative_prompt:
        parts.append(f"without {shown(request.negative_prompt)}")
    return f"<@{user}>: {shown(request.prompt)} ({', '.join(parts)})"


def busy_user(active: int, limit: int) -> str:
    return (
        f":raised_hand: You already have {active} image request{'s' if active != 1 else ''} in progress "
        f"(at most {limit} per person). Wait for one to finish, then try again."
    )


def invite(bot_user: str | None) -> str:
    who = f"<@{bot_user}>" if bot_user else "the Muse app"
    return (
        f":wave: I'm not in this channel, so I can't post images here. Invite me with `/invite {who}` "
        "(or use the command in a channel I'm in, or in a direct message with me) and try again."
    )


def upload_failed(request: GenerateRequest, reason: str) -> str:
    return f":x: {shown(request.prompt)} is ready, but I couldn't upload it to this channel ({escape(reason)})."


# Templates get the error's own message (escaped) and, for a queued request, `what`: its prompt as shown.
REFUSED = {
    Kind.BUSY: ":no_entry: Muse is busy: {message}. Try again in about {retry_after} s.",
    Kind.RESTARTING: ":no_entry: Muse is restarting and takes no new work. Try again in a minute.",
    Kind.UNAVAILABLE: ":no_entry: Muse can't generate images right now ({message}). Tell whoever runs it.",
}
REFUSED_OTHERWISE = ":no_entry: Muse refused the request: {message}"
FAILED = {
    Kind.TIMED_OUT: (
        ":hourglass: {what} timed out ({message}). Muse is busy; try again later, or ask for fewer images."
    ),
    Kind.CRASHED: ":boom: The worker making {what} crashed ({message}). Try again in a moment.",
    Kind.FAILED: ":x: Generating {what} failed: {message}",
    Kind.RESTARTING: ":no_entry: Muse shut down before {what} was made. Try again in a minute.",
    Kind.CANCELLED: ":x: {what} was cancelled ({message}).",
}
FAILED_OTHERWISE = ":x: {what} failed: {message}"


def refused(error: MuseError) -> str:
    """A request the service refused before queueing it."""
    # Field names are already the options' (`--seed`): the SLACK dialect named them when the body was validated.
    words = in_words(error)
    template = REFUSED.get(words.kind, REFUSED_OTHERWISE)
    return template.format(message=escape(words.message), retry_after=words.retry_after)


def failed(request: GenerateRequest, error: MuseError) -> str:
    """A queued request that ended without an image."""
    words = in_words(error)
    template = FAILED.get(words.kind, FAILED_OTHERWISE)
    return template.format(what=shown(request.prompt), message=escape(words.message))
