//! Chat templates: the Jinja templates that models ship to turn a list of messages into a prompt,
//! rendered with minijinja the way Hugging Face transformers renders them with Jinja2.
//!
//! Like transformers (`render_jinja_template` in `utils/chat_template_utils.py`, 4.4x), the
//! environment has `trim_blocks` and `lstrip_blocks` on, a `raise_exception(message)` function,
//! Python string and dict methods (`.strip()`, `.startswith()`, `.items()` ...), and a `tojson`
//! filter that writes JSON as Python's `json.dumps` does. Templates receive `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token` (when the tokenizer has them), and
//! `tools` and `documents`, which are always `none` here.
//!
//! NOTE: transformers also defines `strftime_now(format)`; it is missing here, so templates that
//! call it without checking `strftime_now is defined` fail with a render error.

use std::fmt;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// The speaker: `system`, `user`, `assistant` or another role that the template handles.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// Creates a message from a role and its text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Whether the rendered prompt ends with the header of a new assistant turn
/// (transformers' `add_generation_prompt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationPrompt {
    /// Append the assistant header, so that the model writes the reply next.
    Add,
    /// Render the messages only, for example to score an existing conversation.
    Omit,
}

/// A compiled chat template plus the special-token texts it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The error that `raise_exception` attaches, so that a template's own rejection is
/// distinguished from other render errors without parsing the message.
#[derive(Debug)]
struct TemplateException(String);

impl fmt::Display for TemplateException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts of those tokens, passed to
    /// the template as variables of the same names.
    ///
    /// Returns [`TokenizerError::ChatTemplateSyntax`] when the template does not parse.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", python_tojson);
        env.add_template_owned(TEMPLATE_NAME, neutralize_generation_tags(source))
            .map_err(|err| TokenizerError::ChatTemplateSyntax {
                message: err.to_string(),
            })?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: bos_token.map(str::to_owned),
            eos_token: eos_token.map(str::to_owned),
        })
    }

    /// Returns the template text given to [`ChatTemplate::new`].
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` into a prompt.
    ///
    /// Returns [`TokenizerError::ChatTemplateException`] when the template calls
    /// `raise_exception`, and [`TokenizerError::ChatTemplateRender`] for other failures.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        generation_prompt: GenerationPrompt,
    ) -> Result<String, TokenizerError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|err| {
            TokenizerError::ChatTemplateRender {
                message: err.to_string(),
            }
        })?;

        // Absent tokens stay undefined, as in transformers, rather than rendering as `none`.
        let mut context = vec![
            ("messages", Value::from_serialize(messages)),
            (
                "add_generation_prompt",
                Value::from(generation_prompt == GenerationPrompt::Add),
            ),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        if let Some(bos) = &self.bos_token {
            context.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            context.push(("eos_token", Value::from(eos.as_str())));
        }
        let context: Value = context.into_iter().collect();

        template.render(context).map_err(classify_render_error)
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(TemplateException(message)),
    )
}

fn classify_render_error(err: minijinja::Error) -> TokenizerError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(current) = source {
        if let Some(exception) = current.downcast_ref::<TemplateException>() {
            return TokenizerError::ChatTemplateException {
                message: exception.0.clone(),
            };
        }
        source = current.source();
    }
    TokenizerError::ChatTemplateRender {
        message: err.to_string(),
    }
}

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` tags, which only mark the
/// assistant's tokens for training masks, by an equivalent always-true `if` block. Whitespace
/// control markers (`{%-`, `-%}`) are kept, so the output is unchanged.
fn neutralize_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+']);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(keyword) => {
                out.push_str("{%");
                out.push_str(&inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()]);
                out.push(' ');
                out.push_str(keyword);
                out.push(' ');
                out.push_str(&inner[inner.trim_end_matches(['-', '+']).len()..]);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. Unlike minijinja's own filter, it does not
/// escape `<`, `>`, `&` and `'`, and without `indent` it puts a space after `,` and `:`.
fn python_tojson(
    value: &Value,
    indent: Option<usize>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get("indent")?,
    };
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let (item_separator, key_separator) = match separators {
        Some(pair) if pair.len() == 2 => (pair[0].clone(), pair[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// A JSON writer over template values. It walks minijinja values directly because a detour
/// through `serde_json::Value` would sort object keys, while Python keeps insertion order.
struct JsonStyle {
    indent: Option<usize>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
    /// Escape every non-ASCII character as `\uXXXX`, as Python's `ensure_ascii=True` does.
    ensure_ascii: bool,
}

impl JsonStyle {
    fn write(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&value.to_string()),
            ValueKind::String | ValueKind::Bytes => self.write_string(&value.to_string(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(('[', ']'), items.len(), depth, out, |i, out| {
                    self.write(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = value
                    .try_iter()?
                    .map(|key| {
                        let item = value.get_item(&key)?;
                        let key = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                        Ok((key, item))
                    })
                    .collect::<Result<_, minijinja::Error>>()?;
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(('{', '}'), entries.len(), depth, out, |i, out| {
                    self.write_string(&entries[i].0, out);
                    out.push_str(&self.key_separator);
                    self.write(&entries[i].1, depth + 1, out)
                })?;
            }
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a value of type {other}"),
                ))
            }
        }
        Ok(())
    }

    fn write_container(
        &self,
        (open, close): (char, char),
        len: usize,
        depth: usize,
        out: &mut String,
        mut write_item: impl FnMut(usize, &mut String) -> Result<(), minijinja::Error>,
    ) -> Result<(), minijinja::Error> {
        out.push(open);
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_separator);
            }
            self.new_line(depth + 1, out);
            write_item(i, out)?;
        }
        if len > 0 {
            self.new_line(depth, out);
        }
        out.push(close);
        Ok(())
    }

    /// Writes a JSON string literal. serde_json escapes the same characters as Python does with
    /// `ensure_ascii=False`.
    fn write_string(&self, text: &str, out: &mut String) {
        let literal = serde_json::Value::from(text).to_string();
        if !self.ensure_ascii {
            out.push_str(&literal);
            return;
        }
        for c in literal.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }

    fn new_line(&self, depth: usize, out: &mut String) {
        if let Some(indent) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> ChatMessage {
        ChatMessage::new("user", text)
    }

    #[test]
    fn chatml_renders_with_generation_prompt() -> Result<(), TokenizerError> {
        let template = ChatTemplate::new(CHATML, None, Some("<|im_end|>"))?;
        let text = template.render(&[user("Hi")], GenerationPrompt::Add)?;
        assert_eq!(
            text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = template.render(&[user("Hi")], GenerationPrompt::Omit)?;
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n");
        Ok(())
    }

    #[test]
    fn syntax_error_is_typed() {
        let err =
            ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::ChatTemplateSyntax { message } if !message.is_empty()),
            "{err:?}"
        );
    }

    #[test]
    fn raise_exception_carries_template_message() -> Result<(), TokenizerError> {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok";
        let template = ChatTemplate::new(source, None, None)?;
        let err = template
            .render(&[ChatMessage::new("assistant", "x")], GenerationPrompt::Add)
            .unwrap_err();
        assert!(
            matches!(
                &err,
                TokenizerError::ChatTemplateException { message }
                    if message == "Conversation must start with a user message"
            ),
            "{err:?}"
        );
        assert_eq!(template.render(&[user("x")], GenerationPrompt::Add)?, "ok");
        Ok(())
    }

    #[test]
    fn unknown_function_is_render_error() -> Result<(), TokenizerError> {
        let template = ChatTemplate::new("{{ no_such_function() }}", None, None)?;
        let err = template.render(&[], GenerationPrompt::Add).unwrap_err();
        assert!(
            matches!(err, TokenizerError::ChatTemplateRender { .. }),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn python_string_methods_work() -> Result<(), TokenizerError> {
        let source = "{% for m in messages %}{% if m.content.startswith('  ') %}[{{ m.content.strip() }}]{% endif %}{{ m.role.upper() }}{% endfor %}";
        let template = ChatTemplate::new(source, None, None)?;
        let text = template.render(&[user("  padded  ")], GenerationPrompt::Omit)?;
        assert_eq!(text, "[padded]USER");
        Ok(())
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() -> Result<(), TokenizerError> {
        let source = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let template = ChatTemplate::new(source, None, None)?;
        let text = template.render(&[user("a"), user("b")], GenerationPrompt::Omit)?;
        assert_eq!(text, "a\nb\n");
        Ok(())
    }

    #[test]
    fn special_tokens_are_variables_only_when_present() -> Result<(), TokenizerError> {
        let source = "{{ bos_token }}|{% if eos_token is defined %}eos{% else %}no eos{% endif %}";
        let template = ChatTemplate::new(source, Some("<s>"), None)?;
        assert_eq!(template.render(&[], GenerationPrompt::Omit)?, "<s>|no eos");
        Ok(())
    }

    #[test]
    fn tojson_matches_python_json_dumps() -> Result<(), TokenizerError> {
        let source = "{{ messages[0] | tojson }}\n{{ messages[0] | tojson(2) }}";
        let template = ChatTemplate::new(source, None, None)?;
        let text = template.render(&[user("<b>café & 'x'</b>")], GenerationPrompt::Omit)?;
        assert_eq!(
            text,
            "{\"role\": \"user\", \"content\": \"<b>café & 'x'</b>\"}\n{\n  \"role\": \"user\",\n  \"content\": \"<b>café & 'x'</b>\"\n}"
        );
        Ok(())
    }

    #[test]
    fn tojson_keyword_arguments() -> Result<(), TokenizerError> {
        let source = "{{ messages[0] | tojson(indent=1, sort_keys=true) }}|{{ messages[0].content | tojson(ensure_ascii=true) }}|{{ messages | tojson(separators=[',', ':']) }}";
        let template = ChatTemplate::new(source, None, None)?;
        let text = template.render(&[user("é🙂")], GenerationPrompt::Omit)?;
        assert_eq!(
            text,
            "{\n \"content\": \"é🙂\",\n \"role\": \"user\"\n}|\"\\u00e9\\ud83d\\ude42\"|[{\"role\":\"user\",\"content\":\"é🙂\"}]"
        );
        Ok(())
    }

    #[test]
    fn generation_tags_render_their_body() -> Result<(), TokenizerError> {
        let source = "{% for m in messages %}{%- generation -%}  {{ m.content }}  {%- endgeneration %}{% endfor %}";
        let template = ChatTemplate::new(source, None, None)?;
        assert_eq!(template.render(&[user("x")], GenerationPrompt::Omit)?, "x");
        Ok(())
    }

    #[test]
    fn tools_and_documents_are_none() -> Result<(), TokenizerError> {
        let source = "{{ tools is none }} {{ documents is none }}";
        let template = ChatTemplate::new(source, None, None)?;
        assert_eq!(template.render(&[], GenerationPrompt::Omit)?, "True True");
        Ok(())
    }
}
