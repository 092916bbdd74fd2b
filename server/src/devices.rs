//! The device API: a device's tags and alias, a tag's devices, what the registry knows of a
//! device. The HTTP API (`api`) and, on a gateway, the gRPC push service call these; they
//! only translate requests and answers.
//!
//! # Names
//! A tag or an alias is 1 to 64 bytes of ASCII letters, digits and `_ - . : @`, and belongs
//! to its app. A device has at most `limits.max_tags_per_device` tags and one alias; an
//! alias names at most `limits.max_devices_per_alias` devices (a user's phone and tablet,
//! say); a tag has any number of devices, changed at most `limits.max_tag_batch` at a time.

use std::sync::Arc;

use crate::api::ApiError;
use crate::config::Limits;
use crate::push::Fanout;
use crate::store::{AliasSet, Store, StoreError, TagChange, TagChanged};

/// Longest tag or alias, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Devices one page of a tag lists at most, and by default.
pub const MAX_PAGE: usize = 1000;
/// Devices one page of a tag lists when the request names no limit.
pub const DEFAULT_PAGE: usize = 100;
/// Devices a tag's deletion takes out of it at a time.
const DELETE_PAGE: usize = 1000;

/// Uids one presence request names at most.
pub const MAX_PRESENCE_UIDS: usize = 100;

/// Items one user may opt out of at most.
pub const MAX_OPT_OUT: usize = 32;

/// A uid in a path must follow the credential rule.
fn check_uid(uid: &str) -> Result<(), ApiError> {
    if pigeon_proto::credential::valid_uid(uid) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "uid",
            format!(
                "must be 1 to {} bytes with no control characters",
                pigeon_proto::credential::MAX_UID_LEN
            ),
        ))
    }
}

/// Whether `name` is a valid tag or alias.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"_-.:@".contains(&byte))
}

/// Checks one name; the error names `field`.
pub fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_NAME_LEN} ASCII letters, digits or _ - . : @"),
        ))
    }
}

/// Checks a list of names; an error names the field and the index.
pub fn check_names(field: &str, names: &[String]) -> Result<(), ApiError> {
    match names.iter().position(|name| !valid_name(name)) {
        Some(index) => check_name(&format!("{field}[{index}]"), &names[index]),
        None => Ok(()),
    }
}

/// A device as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceView {
    /// Its token.
    pub token: String,
    /// The uid it acts for.
    pub uid: String,
    /// Its alias, if it has one.
    pub alias: Option<String>,
    /// Its tags, sorted.
    pub tags: Vec<String>,
    /// Whether it is connected now.
    pub online: bool,
}

/// A page of a tag's devices.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TagPage {
    /// Device tokens, in token order.
    pub devices: Vec<String>,
    /// Where the next page starts, when there may be one.
    pub next_cursor: Option<String>,
}

/// The device API of one process.
pub struct Devices {
    store: Arc<dyn Store>,
    fanout: Arc<dyn Fanout>,
    limits: Limits,
}

impl Devices {
    /// The device API over `store`; `fanout` says whether a route is live.
    pub fn new(store: Arc<dyn Store>, fanout: Arc<dyn Fanout>, limits: Limits) -> Self {
        Self {
            store,
            fanout,
            limits,
        }
    }

    /// What `uid` opted out of.
    pub async fn opt_out(&self, app: &str, uid: &str) -> Result<Vec<String>, ApiError> {
        check_uid(uid)?;
        let mut opt_outs = self.store.opt_outs(app, &[uid.to_owned()]).await?;
        Ok(opt_outs.pop().unwrap_or_default())
    }

    /// Replaces what `uid` opted out of: `marketing`, or `category:<name>`, at most
    /// [`MAX_OPT_OUT`]; answers the list kept (sorted, each once).
    pub async fn set_opt_out(
        &self,
        app: &str,
        uid: &str,
        mut opt_out: Vec<String>,
    ) -> Result<Vec<String>, ApiError> {
        check_uid(uid)?;
        if opt_out.len() > MAX_OPT_OUT {
            return Err(ApiError::invalid(
                "opt_out",
                format!("at most {MAX_OPT_OUT} items"),
            ));
        }
        for (index, item) in opt_out.iter().enumerate() {
            let valid =
                item == "marketing" || item.strip_prefix("category:").is_some_and(valid_name);
            if !valid {
                return Err(ApiError::invalid(
                    &format!("opt_out[{index}]"),
                    "must be \"marketing\" or \"category:<name>\" (a name as for tags)",
                ));
            }
        }
        opt_out.sort();
        opt_out.dedup();
        self.store.set_opt_out(app, uid, &opt_out).await?;
        self.retag_opted_out(app, uid, &opt_out).await?;
        Ok(opt_out)
    }

    /// Gives each device of `uid` the reserved tags of what the uid opted out of (and
    /// takes off those it no longer has), so that pushes stored once skip it.
    async fn retag_opted_out(
        &self,
        app: &str,
        uid: &str,
        opt_out: &[String],
    ) -> Result<(), ApiError> {
        let uids = [uid.to_owned()];
        let retag = |names: Vec<String>| {
            let caps = names.iter().filter(|name| crate::caps::is_cap_tag(name));
            let mut tags: Vec<String> = caps.cloned().collect();
            tags.extend(user_tags(names));
            tags.extend(opt_out.iter().map(|item| opt_out_tag(item)));
            Some(tags)
        };
        retag_users(self.store.as_ref(), self.fanout.as_ref(), app, &uids, retag).await?;
        Ok(())
    }

    /// The devices of `uid` (at most [`MAX_PAGE`]), in token order.
    pub async fn of_user(&self, app: &str, uid: &str) -> Result<Vec<DeviceView>, ApiError> {
        check_uid(uid)?;
        let mut tokens = self
            .store
            .tokens_for_uids(app, &[uid.to_owned()])
            .await?
            .pop()
            .unwrap_or_default();
        tokens.sort();
        tokens.truncate(MAX_PAGE);
        let mut devices = Vec::with_capacity(tokens.len());
        for token in tokens {
            match self.get(app, &token).await {
                Ok(device) => devices.push(device),
                // Unbound meanwhile.
                Err(ApiError::NoSuchDevice(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(devices)
    }

    /// Which devices of each of `uids` are online now, and on which node.
    pub async fn presence(
        &self,
        app: &str,
        uids: &[String],
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        if uids.is_empty() || uids.len() > MAX_PRESENCE_UIDS {
            return Err(ApiError::invalid(
                "uids",
                format!("name 1 to {MAX_PRESENCE_UIDS} uids, comma-separated"),
            ));
        }
        if let Some(index) = uids
            .iter()
            .position(|uid| !pigeon_proto::credential::valid_uid(uid))
        {
            return Err(ApiError::invalid(
                &format!("uids[{index}]"),
                "must be 1 to 256 bytes with no control characters",
            ));
        }
        let per_uid = self.store.tokens_for_uids(app, uids).await?;
        let mut answer = Vec::with_capacity(uids.len());
        for (uid, mut tokens) in uids.iter().zip(per_uid) {
            tokens.sort();
            tokens.truncate(MAX_PAGE);
            let mut online = Vec::new();
            for token in tokens {
                let Some(route) = self.store.device(app, &token).await?.and_then(|d| d.route)
                else {
                    continue;
                };
                if self.fanout.is_live(&route).await {
                    online.push(serde_json::json!({"token": token, "node": route.node}));
                }
            }
            answer.push(serde_json::json!({
                "uid": uid,
                "online": !online.is_empty(),
                "devices": online,
            }));
        }
        Ok(answer)
    }

    /// The device `token` of `app`.
    pub async fn get(&self, app: &str, token: &str) -> Result<DeviceView, ApiError> {
        let info = self
            .store
            .device(app, token)
            .await?
            .ok_or_else(|| unknown_device(token))?;
        let online = match &info.route {
            Some(route) => self.fanout.is_live(route).await,
            None => false,
        };
        Ok(DeviceView {
            token: token.to_owned(),
            uid: info.uid,
            alias: (!info.alias.is_empty()).then_some(info.alias),
            tags: user_tags(info.tags.names()),
            online,
        })
    }

    /// Unregisters the device `token` of `app`: the store forgets it (its queue, uid
    /// binding, tags and alias), and its connection, if it has one, closes with 4009.
    pub async fn unregister(&self, app: &str, token: &str) -> Result<(), ApiError> {
        let info = self
            .store
            .unregister(app, token)
            .await?
            .ok_or_else(|| unknown_device(token))?;
        if let Some(route) = &info.route {
            self.fanout
                .close(token, route, pigeon_proto::CloseCode::Unregistered)
                .await;
        }
        Ok(())
    }

    /// Replaces the tags of the device `token` of `app`; its tags as stored.
    pub async fn set_tags(
        &self,
        app: &str,
        token: &str,
        mut tags: Vec<String>,
    ) -> Result<Vec<String>, ApiError> {
        check_names("tags", &tags)?;
        tags.sort();
        tags.dedup();
        let most = self.limits.max_tags_per_device;
        if tags.len() > most {
            return Err(ApiError::invalid(
                "tags",
                format!("a device has at most {most} tags"),
            ));
        }
        // The reserved tags of the device's opt-outs stay.
        let Some(info) = self.store.device(app, token).await? else {
            return Err(unknown_device(token));
        };
        let reserved = info
            .tags
            .names()
            .into_iter()
            .filter(|name| is_reserved(name));
        let kept: Vec<String> = tags.iter().cloned().chain(reserved).collect();
        let Some(retagged) = self.store.set_tags(app, token, &kept).await? else {
            return Err(unknown_device(token));
        };
        self.fanout.retag(app, vec![retagged]).await;
        Ok(tags)
    }

    /// Sets (or, with `None`, clears) the alias of the device `token` of `app`.
    pub async fn set_alias(
        &self,
        app: &str,
        token: &str,
        alias: Option<&str>,
    ) -> Result<(), ApiError> {
        if let Some(alias) = alias {
            check_name("alias", alias)?;
        }
        let most = self.limits.max_devices_per_alias;
        match self.store.set_alias(app, token, alias, most).await? {
            AliasSet::Set => Ok(()),
            AliasSet::UnknownDevice => Err(unknown_device(token)),
            AliasSet::AliasFull => Err(ApiError::invalid(
                "alias",
                format!("names {most} devices already, as many as an alias may"),
            )),
        }
    }

    /// Adds devices to `tag` and takes others out of it.
    pub async fn change_tag(
        &self,
        app: &str,
        tag: &str,
        change: TagChange,
    ) -> Result<TagChanged, ApiError> {
        check_name("tag", tag)?;
        if change.add.is_empty() && change.remove.is_empty() {
            return Err(ApiError::invalid(
                "add",
                "name at least one device in add or remove",
            ));
        }
        let most = self.limits.max_tag_batch;
        for (field, tokens) in [("add", &change.add), ("remove", &change.remove)] {
            if tokens.len() > most {
                return Err(ApiError::invalid(
                    field,
                    format!("at most {most} devices per request"),
                ));
            }
            if let Some(index) = tokens.iter().position(|token| !valid_token(token)) {
                return Err(ApiError::invalid(
                    &format!("{field}[{index}]"),
                    "must be 1 to 256 bytes",
                ));
            }
        }
        let most_tags = self.limits.max_tags_per_device;
        let (changed, retagged) = self.store.change_tag(app, tag, change, most_tags).await?;
        self.fanout.retag(app, retagged).await;
        Ok(changed)
    }

    /// A page of `tag`'s devices after `cursor` (empty: the first page).
    pub async fn tag_devices(
        &self,
        app: &str,
        tag: &str,
        cursor: &str,
        limit: Option<usize>,
    ) -> Result<TagPage, ApiError> {
        check_name("tag", tag)?;
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::invalid(
                "limit",
                format!("must be 1 to {MAX_PAGE}"),
            ));
        }
        if !cursor.is_empty() && !valid_token(cursor) {
            return Err(ApiError::invalid("cursor", "not a cursor this API gave"));
        }
        let devices = self.store.tag_devices(app, tag, cursor, limit).await?;
        let next_cursor = (devices.len() == limit)
            .then(|| devices.last().cloned())
            .flatten();
        Ok(TagPage {
            devices,
            next_cursor,
        })
    }

    /// Takes `tag` off all its devices, a page at a time; how many had it.
    pub async fn delete_tag(&self, app: &str, tag: &str) -> Result<u64, ApiError> {
        check_name("tag", tag)?;
        let mut removed = 0;
        let mut previous_first = None;
        loop {
            let page = self.store.tag_devices(app, tag, "", DELETE_PAGE).await?;
            if page.is_empty() {
                return Ok(removed);
            }
            // Each page leaves the tag, so the next one starts further on; one that does
            // not would repeat forever.
            if previous_first.as_ref() == page.first() {
                return Err(StoreError::Backend("a tag's page did not leave it".to_owned()).into());
            }
            previous_first = page.first().cloned();
            removed += page.len() as u64;
            let change = TagChange {
                add: Vec::new(),
                remove: page,
            };
            let (_, retagged) = self.store.change_tag(app, tag, change, 0).await?;
            self.fanout.retag(app, retagged).await;
        }
    }
}

/// Whether `token` could name a device (the stores tell whether it does).
fn valid_token(token: &str) -> bool {
    (1..=256).contains(&token.len())
}

/// The prefix of the tags Pigeon gives a device for what its user opted out of: `!` is no
/// character of an app's tag names, so they never meet.
const OPT_OUT_TAG: &str = "!optout:";

/// The reserved tag of an opt-out item (`marketing`, `category:<name>`).
pub fn opt_out_tag(item: &str) -> String {
    format!("{OPT_OUT_TAG}{item}")
}

/// Whether a tag is one of Pigeon's own (an opt-out, a frequency cap), not the app's.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with('!')
}

/// The app's own tags among `names`.
fn user_tags(names: Vec<String>) -> Vec<String> {
    names
        .into_iter()
        .filter(|name| !is_reserved(name))
        .collect()
}

/// Gives each device of `uids` (of `app`) the tags `retag` makes of its tags now (`None`:
/// leave it as it is), and tells the processes holding them.
pub async fn retag_users(
    store: &dyn Store,
    fanout: &dyn Fanout,
    app: &str,
    uids: &[String],
    retag: impl Fn(Vec<String>) -> Option<Vec<String>>,
) -> Result<(), StoreError> {
    let mut changed = Vec::new();
    for tokens in store.tokens_for_uids(app, uids).await? {
        for token in tokens {
            let Some(device) = store.device(app, &token).await? else {
                continue; // unbound meanwhile
            };
            let Some(tags) = retag(device.tags.names()) else {
                continue;
            };
            if let Some(retagged) = store.set_tags(app, &token, &tags).await? {
                changed.push(retagged);
            }
        }
    }
    fanout.retag(app, changed).await;
    Ok(())
}

fn unknown_device(token: &str) -> ApiError {
    let shown: String = token.chars().take(64).collect();
    ApiError::NoSuchDevice(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_rule() {
        for name in [
            "news",
            "city:paris",
            "v1.2",
            "a_b-c@d",
            &"t".repeat(MAX_NAME_LEN),
        ] {
            assert!(valid_name(name), "{name}");
        }
        for name in [
            "",
            "with space",
            "brace{",
            "é",
            "tab\t",
            &"t".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(!valid_name(name), "{name:?}");
        }
        let names = vec!["ok".to_owned(), "not ok".to_owned()];
        match check_names("tags", &names) {
            Err(ApiError::InvalidField { field, .. }) => assert_eq!(field, "tags[1]"),
            other => panic!("expected tags[1], got {other:?}"),
        }
    }
}
