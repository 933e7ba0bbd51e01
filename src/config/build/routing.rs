//! The `[routing]` section: what model "auto" means, and the queue's bounds.

use super::super::check::Checker;
use super::super::raw::RawRouting;
use super::super::{DEFAULT_MAX_QUEUE, DEFAULT_MAX_QUEUE_BYTES, RouteOrder, RoutingConfig, Target};
use super::providers::BuiltProvider;

pub(super) fn build_routing(
    raw: RawRouting,
    providers: &[BuiltProvider],
    c: &mut Checker<'_>,
) -> RoutingConfig {
    let auto = match raw.auto {
        Some(targets) => {
            let mut auto: Vec<Target> = Vec::new();
            for (i, text) in targets.into_iter().enumerate() {
                let field = format!("routing.auto[{i}]");
                let Some(target) = Target::parse(text.get_ref()) else {
                    c.at(
                        &text,
                        &field,
                        format!("{:?} is not provider/model", text.get_ref()),
                    );
                    continue;
                };
                let provider = providers.iter().find(|p| p.config.name == target.provider);
                match provider {
                    None => c.at(
                        &text,
                        &field,
                        format!("no provider is named {:?}", target.provider),
                    ),
                    Some(p) if !p.config.models.contains_key(&target.model) => c.at(
                        &text,
                        &field,
                        format!(
                            "provider {:?} lists no model {:?}",
                            target.provider, target.model
                        ),
                    ),
                    Some(_) if auto.contains(&target) => {
                        c.at(&text, &field, format!("{target} is listed twice"));
                    }
                    Some(_) => auto.push(target),
                }
            }
            auto
        }
        None => providers
            .iter()
            .flat_map(|p| {
                p.model_order.iter().map(|model| Target {
                    provider: p.config.name.clone(),
                    model: model.clone(),
                })
            })
            .collect(),
    };
    let max_queue_bytes = match raw.max_queue_bytes {
        Some(max) => {
            if *max.get_ref() == 0 {
                c.at(
                    &max,
                    "routing.max_queue_bytes",
                    "0 would leave no room for any waiting task; at least 1",
                );
            }
            max.into_inner()
        }
        None => DEFAULT_MAX_QUEUE_BYTES,
    };
    let order = match raw.order {
        Some(order) => RouteOrder::ALL
            .into_iter()
            .find(|o| o.as_str() == order.get_ref())
            .unwrap_or_else(|| {
                c.at(
                    &order,
                    "routing.order",
                    format!(
                        "unknown order {:?}: \"listed\" (the order of the route) or \"expiring_first\" (budgets lost at a calendar reset first)",
                        order.get_ref()
                    ),
                );
                RouteOrder::Listed
            }),
        None => RouteOrder::Listed,
    };
    RoutingConfig {
        auto,
        max_queue: raw.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
        max_queue_bytes,
        order,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;
    use crate::config::*;

    #[test]
    fn routes_name_configured_providers_and_models() {
        let f = fixture();
        let rest = format!(
            "{}[routing]\nauto = [",
            provider("gemini", "g1", "GEMINI_KEY")
        );
        let route = |targets: &str| valid(&f.key, "", &format!("{rest}{targets}]\n"));
        refused(
            &route("\"openai/gpt-4o\""),
            &f.env,
            "routing.auto[0]",
            "no provider is named \"openai\"",
        );
        refused(
            &route("\"groq/m\", \"groq/n\""),
            &f.env,
            "routing.auto[1]",
            "lists no model \"n\"",
        );
        refused(
            &route("\"groq\""),
            &f.env,
            "routing.auto[0]",
            "not provider/model",
        );
        refused(
            &route("\"groq/m\", \"groq/m\""),
            &f.env,
            "routing.auto[1]",
            "listed twice",
        );
        let config = accept(&route("\"gemini/gemini-2.0-flash\", \"groq/m\""), &f.env);
        let auto: Vec<String> = config.routing.auto.iter().map(Target::to_string).collect();
        assert_eq!(auto, ["gemini/gemini-2.0-flash", "groq/m"]);
    }

    #[test]
    fn the_default_auto_route_follows_the_file() {
        let f = fixture();
        let text = valid(&f.key, "", &provider("gemini", "g1", "GEMINI_KEY")).replace(
            "[providers.models.m]\nrpm = 30\n",
            "[providers.models.zeta]\n[providers.models.alpha]\nrpm = 1\n",
        );
        let config = accept(&text, &f.env);
        let auto: Vec<String> = config.routing.auto.iter().map(Target::to_string).collect();
        assert_eq!(auto, ["groq/zeta", "groq/alpha", "gemini/gemini-2.0-flash"]);
        assert_eq!(config.providers[0].models["zeta"], ModelLimits::default());
    }

    #[test]
    fn the_queue_bytes_and_the_route_order_are_checked() {
        let f = fixture();
        let routing = |lines: &str| valid(&f.key, "", &format!("[routing]\n{lines}"));
        let config = accept(&routing(""), &f.env);
        assert_eq!(config.routing.max_queue_bytes, 16_777_216);
        assert_eq!(config.routing.order, RouteOrder::Listed);

        let config = accept(
            &routing("max_queue_bytes = 65536\norder = \"expiring_first\""),
            &f.env,
        );
        assert_eq!(config.routing.max_queue_bytes, 65_536);
        assert_eq!(config.routing.order, RouteOrder::ExpiringFirst);
        let config = accept(&routing("order = \"listed\""), &f.env);
        assert_eq!(config.routing.order, RouteOrder::Listed);

        let p = refused(
            &routing("max_queue_bytes = 0"),
            &f.env,
            "routing.max_queue_bytes",
            "0 would",
        );
        assert_eq!(p.line, Some(12));
        for bad in ["expiring", "Listed", ""] {
            let p = refused(
                &routing(&format!("order = \"{bad}\"")),
                &f.env,
                "routing.order",
                "\"listed\"",
            );
            assert!(
                p.message.contains(&format!("unknown order {bad:?}")),
                "{}",
                p.message
            );
            assert!(p.message.contains("\"expiring_first\""), "{}", p.message);
        }
        refused(
            &routing("order = 1"),
            &f.env,
            "routing.order",
            "invalid type",
        );
    }
}
