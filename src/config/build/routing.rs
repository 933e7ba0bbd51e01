//! The `[routing]` section: what model "auto" means, and the queue's bounds.

use super::super::check::Checker;
use super::super::raw::RawRouting;
use super::super::{DEFAULT_MAX_QUEUE, RoutingConfig, Target};
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
    RoutingConfig {
        auto,
        max_queue: raw.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
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
}
