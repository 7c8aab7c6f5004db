//! Parsing the command line as operators write it: flags placed before the
//! subcommand (`docsidecar --listen X serve`) are read as the subcommand's, and
//! an invalid value that came from an environment variable is reported under
//! that variable's name (`DB_PORT`), not only under the flag nobody typed.

use super::Cli;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, FromArgMatches};
use std::ffi::{OsStr, OsString};

/// Parses `argv` (program name first). Errors are clap's, ready for `exit()`.
pub fn parse<I, T>(argv: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    parse_with(&args, |name| std::env::var_os(name).is_some())
}

/// [`parse`], with the environment's contents given by `is_set` (tests).
fn parse_with(args: &[OsString], is_set: impl Fn(&str) -> bool) -> Result<Cli, clap::Error> {
    let error = match try_parse(args) {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        return Err(error);
    }
    if let Some(moved) = subcommand_first(args) {
        match try_parse(&moved) {
            Ok(cli) => return Ok(cli),
            // Its error names the flag that does not belong to the subcommand.
            Err(e) => return Err(explain(e, &moved, &is_set)),
        }
    }
    Err(explain(error, args, &is_set))
}

fn try_parse(args: &[OsString]) -> Result<Cli, clap::Error> {
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(args)?;
    Cli::from_arg_matches(&matches).map_err(|e| e.with_cmd(&command))
}

/// The arguments with the first subcommand name moved right after the program
/// name, when one comes after flags (and is not a flag's value).
fn subcommand_first(args: &[OsString]) -> Option<Vec<OsString>> {
    let command = Cli::command();
    let names: Vec<&str> = command.get_subcommands().map(|c| c.get_name()).collect();
    let mut takes_value = false;
    for (i, arg) in args.iter().enumerate().skip(1) {
        let text = arg.to_string_lossy();
        if takes_value {
            takes_value = false;
            continue;
        }
        if names.contains(&text.as_ref()) {
            if i == 1 {
                return None;
            }
            let mut moved = vec![args[0].clone(), arg.clone()];
            moved.extend(args[1..i].iter().cloned());
            moved.extend(args[i + 1..].iter().cloned());
            return Some(moved);
        }
        if let Some(flag) = text.strip_prefix("--") {
            if !flag.contains('=') {
                takes_value = find_long(&command, flag).is_some_and(|a| {
                    a.get_action().takes_values()
                        && a.get_num_args().is_none_or(|n| n.min_values() > 0)
                });
            }
        }
    }
    None
}

/// The argument with this long flag, in the command or any of its subcommands.
fn find_long<'a>(command: &'a clap::Command, long: &str) -> Option<&'a clap::Arg> {
    command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|sub| sub.get_arguments().find(|a| a.get_long() == Some(long)))
        })
}

/// Names the environment variable behind an invalid value, when the value came
/// from it (the flag is not on the command line and the variable is set).
fn explain(error: clap::Error, args: &[OsString], is_set: &impl Fn(&str) -> bool) -> clap::Error {
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return error;
    }
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let Some(long) = invalid
        .split_whitespace()
        .next()
        .and_then(|f| f.strip_prefix("--"))
    else {
        return error;
    };
    let command = Cli::command();
    // The subcommand's own argument first: `migrate` reads MIGRATE_DB_PORT.
    let sub = args
        .get(1)
        .and_then(|a| command.find_subcommand(a.to_string_lossy().as_ref()));
    let arg = sub
        .and_then(|s| s.get_arguments().find(|a| a.get_long() == Some(long)))
        .or_else(|| command.get_arguments().find(|a| a.get_long() == Some(long)));
    let Some(env) = arg.and_then(|a| a.get_env()).and_then(OsStr::to_str) else {
        return error;
    };
    let on_command_line = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    });
    if on_command_line || !is_set(env) {
        return error;
    }
    let rendered = error.render().to_string();
    // The first paragraph says it all; clap's own help hint follows it.
    let first = rendered.split("\n\n").next().unwrap_or_default();
    let message = first.trim_start_matches("error: ").replacen(
        &format!("'{invalid}'"),
        &format!("{env} (the environment variable of '{invalid}')"),
        1,
    );
    clap::Error::raw(
        ErrorKind::ValueValidation,
        format!("{}\n", message.trim_end()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Command, ListenAddr};

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn flags_before_the_subcommand_are_the_subcommand_s() {
        let cli = parse_with(
            &argv(&["docsidecar", "--listen", "127.0.0.1:7000", "serve"]),
            |_| false,
        )
        .unwrap();
        match cli.command {
            Some(Command::Serve(args)) => {
                assert_eq!(args.listen, ListenAddr::Tcp("127.0.0.1:7000".into()))
            }
            other => panic!("{other:?}"),
        }
        // A value that happens to be a subcommand's name is still a value.
        let cli = parse_with(&argv(&["docsidecar", "--schema", "check", "serve"]), |_| {
            false
        })
        .unwrap();
        match cli.command {
            Some(Command::Serve(args)) => assert_eq!(args.common.schema, "check"),
            other => panic!("{other:?}"),
        }
        // A flag the subcommand does not take is named.
        let err = parse_with(
            &argv(&["docsidecar", "--listen", "127.0.0.1:7000", "migrate"]),
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--listen"), "{err}");
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        // As if the value came from the environment (`is_set` says it is there).
        let err = explain(
            Cli::command()
                .try_get_matches_from(["docsidecar", "--db-port", "0"])
                .unwrap_err(),
            &argv(&["docsidecar"]),
            &|name| name == "DB_PORT",
        )
        .to_string();
        assert!(err.contains("DB_PORT"), "{err}");
        assert!(err.contains("from 1 to 65535"), "{err}");
        // Typed on the command line: the flag is the name to give.
        let err = parse_with(&argv(&["docsidecar", "--db-port", "0"]), |_| true)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("environment variable"), "{err}");
        assert!(err.contains("--db-port"), "{err}");
        // migrate reads the MIGRATE_ variables.
        let err = explain(
            Cli::command()
                .try_get_matches_from(["docsidecar", "migrate", "--db-port", "x"])
                .unwrap_err(),
            &argv(&["docsidecar", "migrate"]),
            &|name| name == "MIGRATE_DB_PORT",
        )
        .to_string();
        assert!(err.contains("MIGRATE_DB_PORT"), "{err}");
    }
}
