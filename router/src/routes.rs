//! Deciding where a connection goes from its first packet: routes are tried
//! in configuration order, the first that matches wins.
use subtle::ConstantTimeEq as _;

use crate::{
    config::{Matcher, Route, Secret},
    sniff::FirstPacket,
};

/// Why a connection is refused (each has its own counter and message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No route matches, and there is no default.
    NoRoute,
    /// A preamble route's token is missing or wrong.
    Unauthorized,
    /// The first bytes break the protocol they claim.
    Invalid,
    /// Every backend of the route failed.
    Unavailable,
    /// Nothing (or not enough) arrived before the first-packet timeout.
    Timeout,
    /// The first packet grew past the size limit without being complete.
    TooLarge,
    /// A listener with `accept_proxy` got no valid PROXY protocol header.
    ProxyHeader,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::NoRoute,
        Refusal::Unauthorized,
        Refusal::Invalid,
        Refusal::Unavailable,
        Refusal::Timeout,
        Refusal::TooLarge,
        Refusal::ProxyHeader,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::Unauthorized => "unauthorized",
            Self::Invalid => "invalid",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::TooLarge => "too_large",
            Self::ProxyHeader => "proxy_header",
        }
    }
}

/// Where a connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index of the route in the configuration.
    pub route: usize,
    /// Bytes at the start of the stream not to forward (a stripped
    /// preamble).
    pub skip: usize,
    /// The length of an HTTP request head to send with `Connection: close`
    /// (the route's `http_close`).
    pub close_http: Option<usize>,
}

/// Picks the route for `first`, or why there is none.
pub fn decide(routes: &[Route], first: &FirstPacket) -> Result<Decision, Refusal> {
    if let FirstPacket::Preamble { route, token, len } = first {
        // A client that names its route gets that route or a refusal, never
        // the default.
        let (index, matcher) = routes
            .iter()
            .enumerate()
            .find_map(|(i, r)| match &r.matcher {
                Matcher::Preamble { name, .. } if name == route => Some((i, &r.matcher)),
                _ => None,
            })
            .ok_or(Refusal::NoRoute)?;
        let Matcher::Preamble {
            token: expected,
            keep,
            ..
        } = matcher
        else {
            unreachable!("found by its preamble matcher");
        };
        if let Some(expected) = expected {
            let given = token.as_ref().map_or("", Secret::expose);
            let expected = expected.expose();
            // Compared in constant time: how much of a guess is right must
            // not show in the timing.
            let equal = given.len() == expected.len()
                && bool::from(given.as_bytes().ct_eq(expected.as_bytes()));
            if !equal {
                return Err(Refusal::Unauthorized);
            }
        }
        return Ok(Decision {
            route: index,
            skip: if *keep { 0 } else { *len },
            close_http: None,
        });
    }
    routes
        .iter()
        .position(|route| match (&route.matcher, first) {
            (
                Matcher::Host(pattern),
                FirstPacket::Http {
                    host: Some(host), ..
                },
            ) => pattern.matches(host),
            (Matcher::Sni(pattern), FirstPacket::Tls { sni: Some(sni) }) => pattern.matches(sni),
            (Matcher::Default, _) => true,
            _ => false,
        })
        .map(|index| Decision {
            route: index,
            skip: 0,
            close_http: match first {
                FirstPacket::Http { head, .. } if routes[index].http_close => Some(*head),
                _ => None,
            },
        })
        .ok_or(Refusal::NoRoute)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn routes() -> Vec<Route> {
        let mut config = Config::default();
        for spec in [
            "host:a.test=127.0.0.1:1",
            "sni:*.b.test=127.0.0.1:2",
            "preamble:db:s3cret=127.0.0.1:3",
            "preamble:open=127.0.0.1:4",
            "default=127.0.0.1:5",
        ] {
            config.add_route_flag(spec).unwrap();
        }
        config.routes
    }

    fn http(host: &str) -> FirstPacket {
        FirstPacket::Http {
            host: Some(host.into()),
            head: 0,
        }
    }

    #[test]
    fn host_and_sni_routes_match_in_order_else_default() {
        let routes = routes();
        assert_eq!(decide(&routes, &http("a.test")).unwrap().route, 0);
        let tls = FirstPacket::Tls {
            sni: Some("x.b.test".into()),
        };
        assert_eq!(decide(&routes, &tls).unwrap().route, 1);
        // An SNI pattern does not match an HTTP Host, and vice versa.
        assert_eq!(decide(&routes, &http("x.b.test")).unwrap().route, 4);
        assert_eq!(decide(&routes, &FirstPacket::Unknown).unwrap().route, 4);
        let without_default = &routes[..4];
        assert_eq!(
            decide(without_default, &http("c.test")),
            Err(Refusal::NoRoute)
        );
    }

    fn preamble(route: &str, token: Option<&str>) -> FirstPacket {
        FirstPacket::Preamble {
            route: route.into(),
            token: token.map(Into::into),
            len: 20,
        }
    }

    #[test]
    fn preambles_check_their_token() {
        let routes = routes();
        assert_eq!(
            decide(&routes, &preamble("db", Some("s3cret"))),
            Ok(Decision {
                route: 2,
                skip: 20,
                close_http: None
            })
        );
        assert_eq!(
            decide(&routes, &preamble("db", Some("s3cres"))),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            decide(&routes, &preamble("db", Some("s3cret-longer"))),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            decide(&routes, &preamble("db", None)),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(decide(&routes, &preamble("open", None)).unwrap().route, 3);
        assert_eq!(
            decide(&routes, &preamble("nope", None)),
            Err(Refusal::NoRoute)
        );
    }
}
