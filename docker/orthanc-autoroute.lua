-- Orthanc -> dicomnode routing: every stable image series is sent to the AI node.
--
-- * NODE_MODALITY is the DicomModalities entry of the node, NODE_AET its AE title.
-- * Series the node itself stored (its SEG / SR results) are never sent back:
--   that would loop. Non-image objects are skipped too.
-- * Series uploaded over REST (no RemoteAET) are forwarded, handy for demos.
-- The store is asynchronous (an Orthanc job), so ingestion never waits on it.

NODE_MODALITY = 'dicomnode'
NODE_AET = 'DICOMNODE'
SKIP_MODALITIES = { SEG = true, SR = true, KO = true, PR = true, RTSTRUCT = true, DOC = true }

local function remoteAet(instanceId)
  local ok, value = pcall(RestApiGet, '/instances/' .. instanceId .. '/metadata/RemoteAET')
  if ok then
    return value
  end
  return ''
end

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  if SKIP_MODALITIES[modality] then
    return
  end
  local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
  if #instances == 0 then
    return
  end
  if remoteAet(instances[1]['ID']) == NODE_AET then
    return
  end
  print('autoroute: sending ' .. modality .. ' series ' .. seriesId .. ' to ' .. NODE_MODALITY)
  RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
              DumpJson({ Resources = { seriesId }, Asynchronous = true }, true))
end
