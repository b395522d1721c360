//! What is rendered from the clap command tree: shell completions, the man
//! page, and the Markdown reference in docs/cli.md.

use std::fmt::Write as _;
use std::io::Write;

use clap::{Arg, ArgAction, Command};

use crate::exit::{OK, UNAVAILABLE};
use crate::CompletionShell;

/// `stitch completions SHELL`: the script on stdout.
pub(crate) fn completions(mut cmd: Command, shell: CompletionShell) -> u8 {
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "stitch", &mut out);
    write_stdout(&out)
}

/// `stitch man`: one roff page for `stitch` followed by one per subcommand
/// (a reader such as `man -l -` shows them in order).
pub(crate) fn man(cmd: Command) -> u8 {
    let mut out = Vec::new();
    if let Err(e) = render_man(&cmd, &mut out) {
        eprintln!("stitch man: {e}");
        return UNAVAILABLE;
    }
    write_stdout(&out)
}

fn render_man(cmd: &Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    render_man_as(cmd, cmd.get_name(), out)
}

/// `cmd`'s page titled `title`, then its subcommands' pages, titled with
/// their full path (`stitch-build-list`).
fn render_man_as(cmd: &Command, title: &str, out: &mut Vec<u8>) -> std::io::Result<()> {
    // Every page's footer names the release, not only the root's.
    let cmd = cmd.clone().version(env!("CARGO_PKG_VERSION"));
    clap_mangen::Man::new(cmd.clone())
        .title(title.to_string())
        .render(out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_man_as(sub, &format!("{title}-{}", sub.get_name()), out)?;
    }
    Ok(())
}

/// `stitch cli-reference`: docs/cli.md.
pub(crate) fn markdown(cmd: Command) -> u8 {
    write_stdout(render_markdown(cmd).as_bytes())
}

fn write_stdout(bytes: &[u8]) -> u8 {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => OK,
        // A closed pipe (`stitch man | head`) is not worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => OK,
        Err(e) => {
            eprintln!("stitch: cannot write to stdout: {e}");
            UNAVAILABLE
        }
    }
}

/// The Markdown reference of every visible command, argument and option,
/// in the tree's order.
pub(crate) fn render_markdown(mut cmd: Command) -> String {
    cmd.build();
    let mut out = String::new();
    out.push_str(
        "# stitch — command-line reference\n\n\
         <!-- Rendered from the clap definitions by `stitch cli-reference > docs/cli.md`;\n     \
         a test fails when this file and the definitions differ. Do not edit by hand. -->\n\n\
         Every command also answers `--help`. Shell completions: `stitch completions \
         bash|zsh|fish`; manual pages: `stitch man`.\n\n",
    );
    out.push_str("## Exit codes\n\n```text\n");
    out.push_str(crate::exit::EXIT_CODES_HELP);
    out.push_str("\n```\n\n");
    let mut path = Vec::new();
    section(&cmd, &mut path, &mut out);
    out
}

fn section(cmd: &Command, path: &mut Vec<String>, out: &mut String) {
    path.push(cmd.get_name().to_string());
    let title = path.join(" ");
    let depth = path.len().min(5);
    let _ = writeln!(out, "{} `{title}`\n", "#".repeat(depth + 1));
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        let _ = writeln!(out, "{}\n", about.to_string().trim_end());
    }
    let usage = cmd.clone().render_usage().to_string();
    let usage = usage.trim_start_matches("Usage: ").trim_end();
    let _ = writeln!(out, "```text\n{usage}\n```\n");
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !is_builtin(a))
        .collect();
    if !args.is_empty() {
        out.push_str("| Argument | Description |\n|---|---|\n");
        for a in args {
            let _ = writeln!(out, "| {} | {} |", arg_name(a), arg_description(a));
        }
        out.push('\n');
    }
    if let Some(after) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        // The root's exit codes have their own section.
        if path.len() > 1 {
            let _ = writeln!(out, "```text\n{}\n```\n", after.to_string().trim_end());
        }
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        section(sub, path, out);
    }
    path.pop();
}

/// `--help` and `--version`, which every command has.
fn is_builtin(a: &Arg) -> bool {
    matches!(
        a.get_action(),
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
    )
}

fn arg_name(a: &Arg) -> String {
    let value = a
        .get_value_names()
        .and_then(|v| v.first())
        .map(|v| v.to_string())
        .unwrap_or_else(|| a.get_id().as_str().to_uppercase());
    let takes_value = a.get_action().takes_values();
    let mut name = match (a.get_long(), a.get_short()) {
        (Some(l), Some(s)) => format!("`-{s}`, `--{l}`"),
        (Some(l), None) => format!("`--{l}`"),
        (None, Some(s)) => format!("`-{s}`"),
        (None, None) => format!("`{value}`"),
    };
    if takes_value && (a.get_long().is_some() || a.get_short().is_some()) {
        name.push_str(&format!(" `{value}`"));
    }
    name
}

fn arg_description(a: &Arg) -> String {
    let mut text = a
        .get_long_help()
        .or(a.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default()
        .replace('\n', " ")
        .replace('|', "\\|")
        .trim()
        .to_string();
    // clap drops the full stop of a one-line doc comment; the table's
    // sentences that follow need it back.
    if !text.is_empty() && !text.ends_with(['.', '!', '?', ')', '`']) {
        text.push('.');
    }
    let values: Vec<String> = a
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    if !values.is_empty() && a.get_action().takes_values() {
        text.push_str(&format!(" One of: {}.", values.join(", ")));
    }
    let defaults: Vec<String> = a
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if !defaults.is_empty() && a.get_action().takes_values() {
        text.push_str(&format!(" Default: `{}`.", defaults.join(",")));
    }
    if let Some(env) = a.get_env() {
        text.push_str(&format!(" Environment: `{}`.", env.to_string_lossy()));
    }
    if a.is_required_set() {
        text.push_str(" Required.");
    }
    if matches!(a.get_action(), ArgAction::Append) {
        text.push_str(" Repeatable.");
    }
    text.trim().to_string()
}
