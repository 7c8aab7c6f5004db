//! MySQL/MariaDB connection settings: the URL (`mysql://`, `mariadb://`,
//! several hosts allowed) and host lists (`DB_HOST=db-0,db-1,db-2`).

use super::ConfigError;
use crate::store::mysql::Host;
use crate::store::tls::SslMode;
use percent_encoding::percent_decode_str;
use std::path::PathBuf;

/// The default MySQL/MariaDB port.
pub const DEFAULT_PORT: u16 = 3306;

/// What a `mysql://` or `mariadb://` URL says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MysqlUrl {
    pub user: Option<String>,
    pub password: Option<String>,
    pub hosts: Vec<Host>,
    pub database: Option<String>,
    pub sslmode: Option<SslMode>,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
}

fn decode(s: &str, what: &str, var: &str) -> Result<String, ConfigError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            ConfigError::Invalid(format!(
                "{var}: the {what} is not UTF-8 once percent-decoded"
            ))
        })
}

/// Hosts separated by commas, each `name`, `name:port` or `[v6]:port`;
/// `default_port` for those without one.
pub fn parse_hosts(list: &str, default_port: u16, var: &str) -> Result<Vec<Host>, ConfigError> {
    let mut hosts = Vec::new();
    for part in list.split(',').map(str::trim) {
        let bad = || {
            ConfigError::Invalid(format!(
                "{var}: `{part}` is not a host, host:port or [IPv6]:port (hosts are separated by commas)"
            ))
        };
        let (name, port) = if let Some(rest) = part.strip_prefix('[') {
            let (name, rest) = rest.split_once(']').ok_or_else(bad)?;
            match rest.strip_prefix(':') {
                Some(port) => (name, Some(port)),
                None if rest.is_empty() => (name, None),
                None => return Err(bad()),
            }
        } else {
            match part.split_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (part, None),
            }
        };
        if name.is_empty() || name.contains(['/', '@', '?', ' ']) {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
            None => default_port,
        };
        hosts.push(Host {
            name: name.to_string(),
            port,
        });
    }
    Ok(hosts)
}

/// Parses `mysql://[user[:password]@]host[:port][,host[:port]…][/database][?params]`
/// (`mariadb://` alike). Parameters: `sslmode` (also `ssl-mode`),
/// `sslrootcert` (`ssl-ca`), `sslcert` (`ssl-cert`), `sslkey` (`ssl-key`).
/// Messages never repeat the user part (it may hold a password).
pub fn parse_url(url: &str, var: &str) -> Result<MysqlUrl, ConfigError> {
    let rest = url
        .strip_prefix("mysql://")
        .or_else(|| url.strip_prefix("mariadb://"))
        .ok_or_else(|| {
            ConfigError::Invalid(format!("{var} is not a mysql:// or mariadb:// URL"))
        })?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, database) = match rest.split_once('/') {
        Some((a, d)) => (a, Some(d)),
        None => (rest, None),
    };
    let mut parsed = MysqlUrl::default();
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                parsed.user = Some(decode(user, "user", var)?);
            }
            parsed.password = password.map(|p| decode(p, "password", var)).transpose()?;
            hosts
        }
        None => authority,
    };
    if hosts.is_empty() {
        return Err(ConfigError::Invalid(format!("{var} names no host")));
    }
    parsed.hosts = parse_hosts(hosts, DEFAULT_PORT, var)?;
    parsed.database = database
        .filter(|d| !d.is_empty())
        .map(|d| decode(d, "database", var))
        .transpose()?;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value, key, var)?;
        match key {
            "sslmode" | "ssl-mode" | "ssl_mode" => {
                parsed.sslmode = Some(
                    value
                        .parse()
                        .map_err(|e| ConfigError::Invalid(format!("{var}: {e}")))?,
                );
            }
            "sslrootcert" | "ssl-ca" => parsed.sslrootcert = Some(value.into()),
            "sslcert" | "ssl-cert" => parsed.sslcert = Some(value.into()),
            "sslkey" | "ssl-key" => parsed.sslkey = Some(value.into()),
            _ => {
                return Err(ConfigError::Invalid(format!(
                "{var}: unknown parameter `{key}` (known: sslmode, sslrootcert, sslcert, sslkey)"
            )))
            }
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, port: u16) -> Host {
        Host {
            name: name.into(),
            port,
        }
    }

    #[test]
    fn urls_with_one_or_several_hosts() {
        let u = parse_url(
            "mysql://app:p%40ss@db-0:3307,db-1,[::1]:3308/orders?sslmode=verify-full&sslrootcert=/ca.pem",
            "DATABASE_URL",
        )
        .unwrap();
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(
            u.hosts,
            [host("db-0", 3307), host("db-1", 3306), host("::1", 3308)]
        );
        assert_eq!(u.database.as_deref(), Some("orders"));
        assert_eq!(u.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(u.sslrootcert, Some(PathBuf::from("/ca.pem")));
        let u = parse_url("mariadb://127.0.0.1", "DATABASE_URL").unwrap();
        assert_eq!((u.user, u.database), (None, None));
        assert_eq!(u.hosts, [host("127.0.0.1", 3306)]);
    }

    #[test]
    fn errors_name_the_setting_and_never_the_password() {
        for url in [
            "mysql://u:hunter2@/db",
            "mysql://u:hunter2@db:port/db",
            "mysql://u:hunter2@db/x?password=hunter3",
            "mysql://u:hunter2@db/x?sslmode=maybe",
        ] {
            let err = parse_url(url, "MIGRATE_DATABASE_URL")
                .unwrap_err()
                .to_string();
            assert!(err.contains("MIGRATE_DATABASE_URL"), "{err}");
            assert!(
                !err.contains("hunter2") && !err.contains("hunter3"),
                "{err}"
            );
        }
        assert!(parse_hosts("a,,b", 1, "DB_HOST").is_err());
        assert_eq!(
            parse_hosts("db-0, db-1:5433", 5432, "DB_HOST").unwrap(),
            [host("db-0", 5432), host("db-1", 5433)]
        );
    }
}
