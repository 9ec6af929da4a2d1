//! Parsing of HH-RLHF dialogues, the `\n\nHuman: ...\n\nAssistant: ...` text format of
//! Anthropic's helpful/harmless preference data.

use super::{PromptMessage, Role, SkipReason};

const HUMAN: &str = "Human:";
const ASSISTANT: &str = "Assistant:";
const TURN_SEPARATOR: &str = "\n\n";

/// One side of an HH-RLHF pair, split at its last assistant turn.
#[derive(Debug)]
struct Dialogue<'a> {
    /// The raw text before the last `\n\nAssistant:`, after leading whitespace is removed.
    prefix: &'a str,
    prompt: Vec<PromptMessage>,
    response: &'a str,
}

/// A turn marker: where it starts in the text, the role it opens and where its content starts.
#[derive(Debug, Clone, Copy)]
struct Marker {
    start: usize,
    role: Role,
    content_start: usize,
}

/// Splits both sides of an HH-RLHF pair into the shared prompt and the two final responses.
///
/// The text before the last `\n\nAssistant:` must be byte-identical in `chosen` and `rejected`.
/// Message contents and responses are trimmed, because the format puts a space after every
/// `Human:` and `Assistant:` and some responses end in spaces.
pub(super) fn split_pair(
    chosen: &str,
    rejected: &str,
) -> Result<(Vec<PromptMessage>, String, String), SkipReason> {
    let chosen_dialogue = parse_dialogue(chosen).map_err(|problem| SkipReason::NotHhDialogue {
        field: "chosen",
        problem,
    })?;
    let rejected_dialogue =
        parse_dialogue(rejected).map_err(|problem| SkipReason::NotHhDialogue {
            field: "rejected",
            problem,
        })?;
    if chosen_dialogue.prefix != rejected_dialogue.prefix {
        return Err(SkipReason::PromptMismatch);
    }
    Ok((
        chosen_dialogue.prompt,
        chosen_dialogue.response.to_owned(),
        rejected_dialogue.response.to_owned(),
    ))
}

/// Returns true when `text` reads as an HH-RLHF dialogue, so format detection can tell an
/// HH-RLHF line with a broken dialogue from a generic line that lacks its prompt.
pub(super) fn looks_like_dialogue(text: &str) -> bool {
    let text = text.trim_start();
    text.starts_with(HUMAN) || text.starts_with(ASSISTANT)
}

fn parse_dialogue(text: &str) -> Result<Dialogue<'_>, &'static str> {
    // Files differ on whether the first turn carries the leading "\n\n", so the first marker is
    // matched without it.
    let text = text.trim_start();
    let first_role = if text.starts_with(HUMAN) {
        Role::User
    } else if text.starts_with(ASSISTANT) {
        Role::Assistant
    } else {
        return Err("the text does not start with a `Human:` or `Assistant:` turn");
    };
    let mut markers = vec![Marker {
        start: 0,
        role: first_role,
        content_start: marker_len(first_role),
    }];
    markers.extend(later_markers(text));

    let Some((last, earlier)) = markers.split_last() else {
        return Err("the text has no turns");
    };
    if last.role != Role::Assistant {
        return Err("the last turn is not an `Assistant:` turn");
    }
    if !earlier.iter().any(|marker| marker.role == Role::User) {
        return Err("no `Human:` turn precedes the final response");
    }

    let prompt = earlier
        .iter()
        .zip(markers.iter().skip(1))
        .map(|(marker, next)| PromptMessage {
            role: marker.role,
            content: text[marker.content_start..next.start].trim().to_owned(),
        })
        .collect();
    Ok(Dialogue {
        prefix: &text[..last.start],
        prompt,
        response: text[last.content_start..].trim(),
    })
}

/// Finds every `\n\nHuman:` and `\n\nAssistant:` in `text`, in order of position.
fn later_markers(text: &str) -> Vec<Marker> {
    let mut markers = Vec::new();
    for role in [Role::User, Role::Assistant] {
        let label = if role == Role::User { HUMAN } else { ASSISTANT };
        let needle = format!("{TURN_SEPARATOR}{label}");
        markers.extend(text.match_indices(&needle).map(|(start, _)| Marker {
            start,
            role,
            content_start: start + needle.len(),
        }));
    }
    // NOTE: the two needles differ at their third byte, so no position matches both and the
    // sort never has to break a tie.
    markers.sort_by_key(|marker| marker.start);
    markers
}

fn marker_len(role: Role) -> usize {
    match role {
        Role::User => HUMAN.len(),
        Role::System | Role::Assistant => ASSISTANT.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: Role, content: &str) -> PromptMessage {
        PromptMessage {
            role,
            content: content.to_owned(),
        }
    }

    #[test]
    fn splits_multi_turn_dialogue() {
        let chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a colour. \n\nAssistant: Blue. ";
        let rejected =
            "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a colour. \n\nAssistant: No.";
        let (prompt, chosen, rejected) = split_pair(chosen, rejected).unwrap();
        assert_eq!(
            prompt,
            vec![
                message(Role::User, "Hi there"),
                message(Role::Assistant, "Hello!"),
                message(Role::User, "Name a colour."),
            ]
        );
        assert_eq!(chosen, "Blue.");
        assert_eq!(rejected, "No.");
    }

    #[test]
    fn accepts_missing_leading_separator() {
        let (prompt, chosen, _) =
            split_pair("Human: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant: B").unwrap();
        assert_eq!(prompt, vec![message(Role::User, "Q")]);
        assert_eq!(chosen, "A");
    }

    #[test]
    fn keeps_consecutive_assistant_turns() {
        let text = "\n\nHuman: Q\n\nAssistant: one\n\nAssistant: two\n\nHuman: R\n\nAssistant: ";
        let (prompt, _, _) = split_pair(&format!("{text}x"), &format!("{text}y")).unwrap();
        let roles: Vec<Role> = prompt.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            vec![Role::User, Role::Assistant, Role::Assistant, Role::User]
        );
    }

    #[test]
    fn finds_marker_after_extra_newline() {
        let (prompt, chosen, _) = split_pair(
            "\n\nHuman: Q\n\n\nAssistant: A",
            "\n\nHuman: Q\n\n\nAssistant: B",
        )
        .unwrap();
        assert_eq!(prompt, vec![message(Role::User, "Q")]);
        assert_eq!(chosen, "A");
    }

    #[test]
    fn keeps_inline_role_words_in_response() {
        let (_, chosen, _) = split_pair(
            "\n\nHuman: Q\n\nAssistant: A. Human: more",
            "\n\nHuman: Q\n\nAssistant: B",
        )
        .unwrap();
        assert_eq!(chosen, "A. Human: more");
    }

    #[test]
    fn rejects_response_that_continues_dialogue() {
        // The chosen side runs on into another Human turn, so its last turn is not the
        // assistant's.
        let reason = split_pair(
            "\n\nHuman: Q\n\nAssistant: A\n\nHuman: more",
            "\n\nHuman: Q\n\nAssistant: B",
        )
        .unwrap_err();
        assert!(matches!(
            reason,
            SkipReason::NotHhDialogue {
                field: "chosen",
                ..
            }
        ));
    }

    #[test]
    fn rejects_differing_prompts() {
        let reason = split_pair(
            "\n\nHuman: Q\n\nAssistant: A\n\nHuman: R\n\nAssistant: C",
            "\n\nHuman: Q\n\nAssistant: B",
        )
        .unwrap_err();
        assert!(matches!(reason, SkipReason::PromptMismatch));
    }

    #[test]
    fn rejects_text_without_turns() {
        let reason = split_pair("just text", "\n\nHuman: Q\n\nAssistant: B").unwrap_err();
        assert!(matches!(
            reason,
            SkipReason::NotHhDialogue {
                field: "chosen",
                ..
            }
        ));
    }

    #[test]
    fn rejects_dialogue_without_human_turn() {
        let reason = split_pair("\n\nAssistant: A", "\n\nAssistant: B").unwrap_err();
        assert!(matches!(reason, SkipReason::NotHhDialogue { .. }));
    }
}
