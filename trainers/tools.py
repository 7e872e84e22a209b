"""The 16 TinyAgent tools, in the label order of the released ToolRAG checkpoint.

The order matters: index i of a classifier's logits is TOOL_NAMES[i], so a checkpoint
trained elsewhere (squeeze-ai-lab/TinyAgent-ToolRAG) can be scored by our evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass

JOIN_TOOL = "join"
END_OF_PLAN = "<END_OF_PLAN>"


@dataclass(frozen=True)
class Tool:
    name: str
    signature: str
    description: str


TOOLS: tuple[Tool, ...] = (
    Tool(
        "create_calendar_event",
        "(title: str, start_date: str, end_date: str, location: str, invitees: list[str], notes: str, calendar: str) -> str",
        "Creates a calendar event. Dates are 'YYYY-MM-DD HH:MM:SS'. invitees takes email addresses.",
    ),
    Tool("get_phone_number", "(name: str) -> str", "Looks up the phone number of a contact by name."),
    Tool("get_email_address", "(name: str) -> str", "Looks up the email address of a contact by name."),
    Tool(
        "open_and_get_file_path",
        "(file_name: str) -> str",
        "Opens the file whose name best matches and returns its path.",
    ),
    Tool("summarize_pdf", "(pdf_path: str) -> str", "Summarizes the PDF at the given path."),
    Tool(
        "compose_new_email",
        "(recipients: list[str], cc: list[str], subject: str, context: str, attachments: list[str]) -> str",
        "Composes a new email. recipients and cc take email addresses; attachments take file paths.",
    ),
    Tool(
        "reply_to_email",
        "(cc: list[str], context: str, attachments: list[str]) -> str",
        "Replies to the email that is currently selected.",
    ),
    Tool(
        "forward_email",
        "(recipients: list[str], cc: list[str], context: str, attachments: list[str]) -> str",
        "Forwards the email that is currently selected.",
    ),
    Tool("maps_open_location", "(location: str) -> str", "Shows a location in Maps."),
    Tool(
        "maps_show_directions",
        "(start_location: str, end_location: str, transport: str) -> str",
        "Shows directions; transport is 'd' (driving), 'w' (walking) or 'r' (public transit).",
    ),
    Tool("create_note", "(name: str, content: str, folder: str) -> str", "Creates a note."),
    Tool("open_note", "(name: str, folder: str) -> str", "Opens an existing note and returns its content."),
    Tool(
        "append_note_content",
        "(name: str, content: str, folder: str) -> str",
        "Appends content to an existing note.",
    ),
    Tool(
        "create_reminder",
        "(name: str, due_date: str, notes: str, list_name: str, priority: int, all_day: bool) -> str",
        "Creates a reminder. due_date is 'YYYY-MM-DD HH:MM:SS'.",
    ),
    Tool("send_sms", "(recipients: list[str], message: str) -> str", "Sends an SMS; recipients take phone numbers."),
    Tool(
        "get_zoom_meeting_link",
        "(topic: str, start_time: str, duration: int, meeting_invitees: list[str]) -> str",
        "Creates a Zoom meeting and returns its link. duration is in minutes.",
    ),
)

TOOL_NAMES: tuple[str, ...] = tuple(tool.name for tool in TOOLS)
TOOL_INDEX: dict[str, int] = {name: index for index, name in enumerate(TOOL_NAMES)}
NUM_TOOLS = len(TOOLS)
assert NUM_TOOLS == 16
PLAN_TOOL_NAMES = frozenset(TOOL_NAMES) | {JOIN_TOOL}


def tools_to_label_vector(tool_names: set[str] | frozenset[str] | list[str]) -> list[float]:
    """Multi-hot vector of length 16 in TOOL_NAMES order; `join` and unknown names are ignored."""
    vector = [0.0] * NUM_TOOLS
    for name in tool_names:
        index = TOOL_INDEX.get(name)
        if index is not None:
            vector[index] = 1.0
    return vector
