//! Snapshots: the rotator's state as store rows (budgets, key states, provider
//! backoffs), changed ones for each commit or all of them for a clean stop, and the
//! rotator rebuilt from them after a restart. The rows' names and shapes are
//! [`crate::state`]'s; the store only keeps the bytes.

use super::{RestoreError, Rotator};
use crate::ledger;
use crate::state::{KeyStates, ProviderBackoff, Row};

impl Rotator {
    /// See [`crate::ledger::Ledger::leases_opened`]: read with the snapshot it is to describe.
    pub fn leases_opened(&self) -> u64 {
        self.ledger.leases_opened()
    }

    /// Rows changed since the last call (budgets with their leases counted as spent, key
    /// states, provider backoffs): what a commit writes.
    pub fn snapshot_dirty(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut rows: Vec<(String, Vec<u8>)> = self
            .ledger
            .snapshot_dirty()
            .into_iter()
            .map(|(id, bytes)| (Row::Budget(&id).name(), bytes))
            .collect();
        let keys = std::mem::take(&mut self.dirty_keys);
        for label in keys {
            match self.key_row(&label) {
                Some(row) => rows.push(row),
                None => {
                    self.dirty_keys.insert(label);
                }
            }
        }
        let providers = std::mem::take(&mut self.dirty_providers);
        for name in providers {
            match self.provider_row(&name) {
                Some(row) => rows.push(row),
                None => {
                    self.dirty_providers.insert(name);
                }
            }
        }
        rows
    }

    /// Every row, budgets without leases: for a clean stop.
    pub fn snapshot_exact(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut rows: Vec<(String, Vec<u8>)> = self
            .ledger
            .snapshot_exact()
            .into_iter()
            .map(|(id, bytes)| (Row::Budget(&id).name(), bytes))
            .collect();
        let labels: Vec<String> = self.keys.iter().map(|k| k.label.clone()).collect();
        rows.extend(labels.iter().filter_map(|l| self.key_row(l)));
        let names: Vec<String> = self.providers.keys().cloned().collect();
        rows.extend(names.iter().filter_map(|n| self.provider_row(n)));
        self.dirty_keys.clear();
        self.dirty_providers.clear();
        rows
    }

    fn key_row(&self, label: &str) -> Option<(String, Vec<u8>)> {
        let mut states = self.states.get(label).cloned().unwrap_or_default();
        states.models.retain(|_, s| !s.is_empty());
        ledger::encode(&Row::Key(label).name(), &states)
    }

    fn provider_row(&self, name: &str) -> Option<(String, Vec<u8>)> {
        let backoff = self
            .provider_states
            .get(name)
            .map(|p| p.backoff.clone())
            .unwrap_or_default();
        ledger::encode(&Row::Provider(name).name(), &backoff)
    }

    /// Rebuilds budgets, key states and provider backoffs from persisted rows (meant
    /// for a fresh rotator). Rows of keys, providers or budgets no longer configured, and
    /// rows of other kinds, are ignored; a row that fails to parse is an error, and then
    /// nothing is restored.
    pub fn restore<I>(&mut self, rows: I) -> Result<(), RestoreError>
    where
        I: IntoIterator<Item = (String, Vec<u8>)>,
    {
        let mut budgets = Vec::new();
        let mut keys = Vec::new();
        let mut providers = Vec::new();
        for (id, bytes) in rows {
            match Row::parse(&id) {
                Row::Budget(budget) => budgets.push((budget.to_owned(), bytes)),
                Row::Key(label) if self.key(label).is_some() => {
                    let states: KeyStates = ledger::decode(&id, &bytes)?;
                    keys.push((label.to_owned(), states));
                }
                Row::Provider(name) if self.providers.contains_key(name) => {
                    let backoff: ProviderBackoff = ledger::decode(&id, &bytes)?;
                    providers.push((name.to_owned(), backoff));
                }
                Row::Key(_) | Row::Provider(_) | Row::KeyFile(_) | Row::Other(_) => {}
            }
        }
        // Parsed budgets are applied by the ledger only once all of them have parsed.
        self.ledger.restore(budgets).map_err(|e| match e {
            RestoreError::Corrupt { id, source } => RestoreError::Corrupt {
                id: Row::Budget(&id).name(),
                source,
            },
        })?;
        for (label, mut states) in keys {
            let models = self
                .key(&label)
                .map(|k| k.models.clone())
                .unwrap_or_default();
            states.models.retain(|m, _| models.contains(m));
            self.states.insert(label, states);
        }
        for (name, backoff) in providers {
            self.provider_states.entry(name).or_default().backoff = backoff;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::rotator::test_support::*;

    #[test]
    fn states_and_budgets_survive_a_restart() {
        let mut r = two_providers();
        let now = at("2026-01-01T00:00:00Z");
        let mut attempt = Attempt::new();
        let c = call(&mut r, &route(), now);
        r.record(
            &c,
            &limited(Some(secs(300)), LimitScope::Minute),
            &mut attempt,
            now,
            true,
            0.5,
        );
        let c = call(&mut r, &route(), now);
        r.record(
            &c,
            &failed(Failure::KeyRejected {
                status: 403,
                detail: "forbidden".to_owned(),
            }),
            &mut attempt,
            now,
            true,
            0.5,
        );
        let big = Cost {
            requests: 1,
            tokens: 9000,
        };
        let Plan::Call(c) = r.plan(&route(), big, &Attempt::new(), now, now + secs(120), true)
        else {
            panic!("expected a call");
        };
        r.record(
            &c,
            &failed(Failure::TooLarge {
                detail: "too large".to_owned(),
            }),
            &mut attempt,
            now,
            true,
            0.5,
        );
        let c = call(&mut r, &route(), now);
        r.record(&c, &ok(), &mut attempt, now, true, 0.5);
        let before = r.key_reports(now, true);

        // A crash: only what was committed survives.
        let rows = r.snapshot_dirty();
        let mut after = two_providers();
        after.restore(rows).expect("restores");
        assert_eq!(after.key_reports(now, true), before);
        assert!(matches!(
            after.plan(&route(), big, &Attempt::new(), now, now + secs(120), true),
            Plan::Call(Call { label, .. }) if label != "g3"
        ));
        // And a clean stop.
        let mut again = two_providers();
        again.restore(r.snapshot_exact()).expect("restores");
        assert_eq!(again.key_reports(now, true), before);
        // Rows of other kinds and of keys no longer configured are ignored; a broken
        // row is an error.
        let mut other = two_providers();
        other
            .restore(vec![
                ("key/gone".to_owned(), b"?".to_vec()),
                ("task/1".to_owned(), b"?".to_vec()),
            ])
            .expect("ignored");
        assert!(
            other
                .restore(vec![("key/g1".to_owned(), b"?".to_vec())])
                .is_err()
        );
    }
}
